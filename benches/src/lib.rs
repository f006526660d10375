//! A small bench harness: each measurement is reported next to a baseline
//! measured in the same run, as a ratio, so figures survive a noisy machine.
//!
//! `cargo bench -p lever-benches` runs the full sampling; add `-- --quick`
//! (or set `LEVER_BENCH_QUICK=1`) for the few-second mode CI uses so the
//! benches cannot rot.

#![allow(clippy::unwrap_used, unreachable_pub)]

use std::hint::black_box;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Median time per iteration.
    pub median: Duration,
    /// 90th percentile of the per-sample means.
    pub p90: Duration,
    pub iterations: u64,
}

#[derive(Debug)]
pub struct Harness {
    pub quick: bool,
    samples: usize,
    sample_time: Duration,
}

impl Harness {
    pub fn from_env() -> Harness {
        let quick = std::env::args().any(|a| a == "--quick")
            || std::env::var_os("LEVER_BENCH_QUICK").is_some_and(|v| v != "0");
        if quick {
            Harness {
                quick,
                samples: 7,
                sample_time: Duration::from_millis(20),
            }
        } else {
            Harness {
                quick,
                samples: 31,
                sample_time: Duration::from_millis(150),
            }
        }
    }

    /// Runs `f` repeatedly: a warm-up, then `samples` samples of about
    /// `sample_time` each; returns the median and p90 time per call.
    pub fn measure<R>(&self, name: &str, mut f: impl FnMut() -> R) -> Sample {
        // Calibrate: how many calls fill one sample.
        let mut per_sample = 1u64;
        loop {
            let t = Instant::now();
            for _ in 0..per_sample {
                black_box(f());
            }
            if t.elapsed() >= self.sample_time / 4 || per_sample >= 1 << 24 {
                let scale = self.sample_time.as_secs_f64() / t.elapsed().as_secs_f64().max(1e-9);
                per_sample = ((per_sample as f64 * scale).ceil() as u64).clamp(1, 1 << 26);
                break;
            }
            per_sample *= 2;
        }
        let mut means: Vec<Duration> = (0..self.samples)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..per_sample {
                    black_box(f());
                }
                t.elapsed() / u32::try_from(per_sample).unwrap_or(u32::MAX)
            })
            .collect();
        means.sort();
        let s = Sample {
            median: means[means.len() / 2],
            p90: means[(means.len() * 9) / 10],
            iterations: per_sample * self.samples as u64,
        };
        println!(
            "  {name:<48} median {:>10}  p90 {:>10}  ({} calls)",
            fmt(s.median),
            fmt(s.p90),
            s.iterations
        );
        s
    }

    /// Prints `subject / baseline` for the medians.
    pub fn ratio(&self, what: &str, subject: Sample, baseline: Sample) -> f64 {
        let r = subject.median.as_secs_f64() / baseline.median.as_secs_f64().max(1e-12);
        if r < 0.1 {
            println!("  => {what}: {r:.5}x the baseline ({:.0}x faster)", 1.0 / r);
        } else {
            println!("  => {what}: {r:.2}x the baseline");
        }
        r
    }
}

pub fn fmt(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns < 10_000 {
        format!("{ns} ns")
    } else if ns < 10_000_000 {
        format!("{:.1} us", ns as f64 / 1e3)
    } else {
        format!("{:.2} ms", ns as f64 / 1e6)
    }
}

/// Processes, ports and a first agent for the benches that run a broker.
pub mod setup {
    use std::process::Child;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::client::conn::http1::SendRequest;
    use hyper_util::rt::TokioIo;
    use lever_broker::client::{self, ClientTls, Target};
    use serde_json::{Value, json};

    /// The argument that makes a bench binary serve `lever-tool-db`: a
    /// tool's `command` is `[EXE, ROLE_TOOL, DB]`, and the broker appends
    /// `-backend ADDR` when it starts it.
    pub const ROLE_TOOL: &str = "--bench-role-tool";

    /// Serves the tool when this process was started as one (see
    /// [`ROLE_TOOL`]); returns false otherwise.
    pub fn role_tool() -> bool {
        let args: Vec<String> = std::env::args().collect();
        let Some(i) = args.iter().position(|a| a == ROLE_TOOL) else {
            return false;
        };
        let db = std::path::PathBuf::from(&args[i + 1]);
        let j = args.iter().position(|a| a == "-backend").unwrap();
        let addr: std::net::SocketAddr = args[j + 1].parse().unwrap();
        let db = std::sync::Arc::new(
            lever_tool_db::db::Db::open(&db, vec!["users".into(), "orders".into()], 100).unwrap(),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(lever_tool_db::server::serve_http(addr, db));
        true
    }

    pub fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// A child process stopped on drop: SIGTERM first (a broker then stops
    /// its tool backends, nginx's master its workers), SIGKILL after 1 s.
    #[derive(Debug)]
    pub struct Proc(pub Child);

    impl Drop for Proc {
        fn drop(&mut self) {
            if let Some(pid) = rustix::process::Pid::from_raw(self.0.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            // A broker under callgrind writes its profile as it exits.
            let grace = if std::env::var_os("LEVER_BENCH_CALLGRIND").is_some() {
                30
            } else {
                1
            };
            let deadline = Instant::now() + Duration::from_secs(grace);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// The broker role: runs `lever broker` on `$BROKER_CONFIG` in this
    /// process, on a runtime built as `lever broker` builds its own (the
    /// jail workers, `TOKIO_WORKER_THREADS` of them, start inside).
    pub fn role_broker() {
        let path = std::env::var("BROKER_CONFIG").unwrap();
        let cfg = lever_policy::config::load(
            std::path::Path::new(&path),
            &lever_policy::config::Env::from_process(),
        )
        .unwrap()
        .config;
        let broker = lever_broker::open(cfg).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(lever_broker::run(broker)).unwrap();
    }

    /// Starts this bench binary in the broker role on `config` (with extra
    /// `env`) and waits until its admin port answers `/healthz`:
    /// (process, admin target, jail target).
    pub fn start_broker(
        rt: &tokio::runtime::Runtime,
        config: &std::path::Path,
        (admin, jail): (u16, u16),
        env: &[(&str, &str)],
    ) -> (Proc, Target, Target) {
        // `LEVER_BENCH_CALLGRIND=a,b`: the brokers whose state directory's
        // name starts with one of these run under callgrind, for counts of
        // instructions per request that the host's noise cannot move
        // (`benches/callgrind.sh`).
        let dir = config
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let profiled = std::env::var("LEVER_BENCH_CALLGRIND")
            .is_ok_and(|m| m.split(',').any(|x| !x.is_empty() && dir.starts_with(x)));
        let mut cmd = if profiled {
            let mut c = std::process::Command::new("valgrind");
            c.arg("--tool=callgrind").arg(format!(
                "--callgrind-out-file={}/lever-callgrind.{dir}.%p",
                std::env::temp_dir().display()
            ));
            c.arg(std::env::current_exe().unwrap());
            c
        } else {
            std::process::Command::new(std::env::current_exe().unwrap())
        };
        let proc = Proc(
            cmd.env("LEVER_BENCH_ROLE", "broker")
                .env("BROKER_CONFIG", config)
                .envs(env.iter().copied())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let admin = Target {
            https: false,
            host: "127.0.0.1".into(),
            port: admin,
        };
        let jail = Target {
            https: true,
            host: "localhost".into(),
            port: jail,
        };
        rt.block_on(async {
            for _ in 0..600 {
                if client::send(&admin, None, http::Method::GET, "/healthz", &[], None)
                    .await
                    .is_ok_and(|r| r.status == 200)
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("the broker never answered /healthz");
        });
        (proc, admin, jail)
    }

    /// Enrols the manager with a bootstrap ticket, as `lever agent` would,
    /// and mints a token for `grants`: (CA PEM, client TLS, token).
    pub async fn enrol(
        admin: &Target,
        jail: &Target,
        grants: Value,
    ) -> (String, ClientTls, String) {
        let post = |t: &Target, tls: Option<&ClientTls>, path: &str, body: Value| {
            let (t, tls, path) = (t.clone(), tls.cloned(), path.to_owned());
            async move {
                client::send(
                    &t,
                    tls.as_ref(),
                    http::Method::POST,
                    &path,
                    &[],
                    Some(&body),
                )
                .await
                .unwrap()
                .json()
            }
        };
        let v = post(admin, None, "/bootstrap", json!({})).await;
        let (ticket, ca) = (
            v["ticket"].as_str().unwrap().to_owned(),
            v["ca"].as_str().unwrap().to_owned(),
        );
        let (key, csr) = client::key_and_csr("manager").unwrap();
        let anon = ClientTls::new(&ca, None).unwrap();
        let v = post(
            jail,
            Some(&anon),
            "/v1/enrol",
            json!({"ticket": ticket, "csr": csr}),
        )
        .await;
        let cert = v["certificate"].as_str().unwrap().to_owned();
        let tls = ClientTls::new(&ca, Some((&cert, &key))).unwrap();
        let v = post(
            jail,
            Some(&tls),
            "/v1/capabilities",
            json!({"grants": grants}),
        )
        .await;
        (ca, tls, v["token"].as_str().unwrap().to_owned())
    }

    /// One HTTP/1.1 keep-alive connection to a loopback port, over TLS
    /// (server name `localhost`) when `tls` is given.
    pub async fn connect(port: u16, tls: Option<&ClientTls>) -> SendRequest<Full<Bytes>> {
        let io = crate::lean::open(port, tls).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .unwrap();
        tokio::spawn(conn);
        send
    }
}

/// A lean HTTP/1.1 keep-alive client for load generation. The load
/// generator shares the machine's two cores with the proxies it measures,
/// so every microsecond it spends per request is taken from them: here a
/// request is a prebuilt byte string written as it is, and its response is
/// read in the caller's task (no connection task, no channel between the
/// two, no allocation per request). Streams and anything else keep using
/// hyper.
pub mod lean {
    use lever_broker::client::ClientTls;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// A connection's stream: TCP, or TLS over it.
    pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
    impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

    /// One keep-alive connection.
    pub struct Conn {
        io: Box<dyn Io>,
        buf: Vec<u8>,
        /// The server said `connection: close` (nginx does after 1,000
        /// requests on a connection): open a new one before the next call.
        pub closed: bool,
    }

    impl std::fmt::Debug for Conn {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Conn")
                .field("closed", &self.closed)
                .finish_non_exhaustive()
        }
    }

    /// A whole HTTP/1.1 request: `POST path` with `headers` and `body`.
    pub fn post(path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
        let mut r = format!("POST {path} HTTP/1.1\r\n");
        for (k, v) in headers {
            r.push_str(&format!("{k}: {v}\r\n"));
        }
        r.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
        let mut r = r.into_bytes();
        r.extend_from_slice(body);
        r
    }

    /// A stream to `127.0.0.1:port` (no Nagle delay), over TLS to
    /// `localhost` when `tls` is given.
    pub async fn open(port: u16, tls: Option<&ClientTls>) -> std::io::Result<Box<dyn Io>> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        Ok(match tls {
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from("localhost")
                    .map_err(std::io::Error::other)?;
                Box::new(tls.connector().connect(name, tcp).await?)
            }
            None => Box::new(tcp),
        })
    }

    /// A keep-alive connection to `127.0.0.1:port`, over TLS to `localhost`
    /// when `tls` is given.
    pub async fn connect(port: u16, tls: Option<&ClientTls>) -> std::io::Result<Conn> {
        Ok(Conn {
            io: open(port, tls).await?,
            buf: Vec::with_capacity(16 << 10),
            closed: false,
        })
    }

    impl Conn {
        /// Sends `request` and reads its whole response: its status.
        pub async fn call(&mut self, request: &[u8]) -> std::io::Result<u16> {
            self.io.write_all(request).await?;
            self.buf.clear();
            loop {
                if let Some(r) = parse(&self.buf)? {
                    if r.len != self.buf.len() {
                        return Err(invalid("bytes after the response"));
                    }
                    self.closed = r.close;
                    return Ok(r.status);
                }
                if self.buf.capacity() - self.buf.len() < 4096 {
                    self.buf.reserve(16 << 10);
                }
                if self.io.read_buf(&mut self.buf).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
        }
    }

    fn invalid(what: &str) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
    }

    /// A complete response at the start of a buffer.
    #[derive(Debug, PartialEq, Eq)]
    pub struct Parsed {
        pub status: u16,
        /// Its length in bytes, head and body.
        pub len: usize,
        /// `connection: close`.
        pub close: bool,
    }

    /// The response at the start of `buf`: `None` until it is complete.
    /// Bodies framed by `content-length` or chunked; a response framed by
    /// neither is refused (it would end only with the connection).
    pub fn parse(buf: &[u8]) -> std::io::Result<Option<Parsed>> {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut r = httparse::Response::new(&mut headers);
        let head = match r.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(invalid(&e.to_string())),
        };
        let status = r.code.unwrap_or(0);
        let (mut length, mut chunked, mut close) = (None, false, false);
        for h in r.headers.iter() {
            let v = std::str::from_utf8(h.value).map_err(|_| invalid("header value"))?;
            if h.name.eq_ignore_ascii_case("content-length") {
                length = Some(v.trim().parse::<usize>().map_err(|_| invalid(v))?);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.trim().eq_ignore_ascii_case("chunked");
            } else if h.name.eq_ignore_ascii_case("connection") {
                close = v.trim().eq_ignore_ascii_case("close");
            }
        }
        let len = if chunked {
            match chunked_len(&buf[head..])? {
                Some(n) => head + n,
                None => return Ok(None),
            }
        } else if let Some(n) = length {
            if buf.len() < head + n {
                return Ok(None);
            }
            head + n
        } else if status == 204 || status == 304 {
            head
        } else {
            return Err(invalid("a response without content-length or chunks"));
        };
        Ok(Some(Parsed { status, len, close }))
    }

    /// The length of a complete chunked body at the start of `b` (trailers
    /// included), `None` until it is complete.
    fn chunked_len(b: &[u8]) -> std::io::Result<Option<usize>> {
        let mut at = 0;
        loop {
            let (n, size) = match httparse::parse_chunk_size(&b[at..]) {
                Ok(httparse::Status::Complete(c)) => c,
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(_) => return Err(invalid("chunk size")),
            };
            at += n;
            if size == 0 {
                // Trailers (none, usually), then an empty line.
                loop {
                    let Some(eol) = b[at..].windows(2).position(|w| w == b"\r\n") else {
                        return Ok(None);
                    };
                    at += eol + 2;
                    if eol == 0 {
                        return Ok(Some(at));
                    }
                }
            }
            let size = usize::try_from(size).map_err(|_| invalid("chunk size"))?;
            if b.len() < at + size + 2 {
                return Ok(None);
            }
            if &b[at + size..at + size + 2] != b"\r\n" {
                return Err(invalid("chunk end"));
            }
            at += size + 2;
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn whole(r: &[u8]) -> Parsed {
            // Every prefix is incomplete; the whole is complete.
            for cut in 0..r.len() {
                assert_eq!(parse(&r[..cut]).unwrap(), None, "prefix of {cut} bytes");
            }
            parse(r).unwrap().unwrap()
        }

        #[test]
        fn responses_end_where_their_framing_says() {
            let r = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
            let p = whole(r);
            assert_eq!((p.status, p.len, p.close), (200, r.len(), false));

            let r = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n3;x=y\r\nabc\r\n0\r\n\r\n";
            let p = whole(r);
            assert_eq!((p.status, p.len, p.close), (201, r.len(), true));

            let r =
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\nx-trailer: 1\r\n\r\n";
            assert_eq!(whole(r).len, r.len());

            let r = b"HTTP/1.1 204 No Content\r\n\r\n";
            assert_eq!(whole(r).status, 204);

            // What follows a response is not part of it.
            let mut two = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA".to_vec();
            assert_eq!(parse(&two).unwrap().unwrap().len, two.len() - 5);
            two.truncate(10);
            assert_eq!(parse(&two).unwrap(), None);
        }

        #[test]
        fn unframed_or_broken_responses_are_refused() {
            for bad in [
                &b"HTTP/1.1 200 OK\r\n\r\nbody until close"[..],
                b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabXY0\r\n\r\n",
                b"NOT HTTP\r\n\r\n",
            ] {
                assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
            }
        }
    }
}

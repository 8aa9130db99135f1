//! Test harness for the integration tests: a real `redis-server` per test, the real
//! `resplica` binary in front of it, raw-TCP helpers and bounded polling.
//!
//! Every wait is a bounded poll on an observable condition; nothing sleeps for a fixed time
//! where a condition can be polled. Processes are killed on drop; when a test panics, the
//! proxy's and Redis's logs are printed so the failure explains itself.

#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use resplica::resp::ReplySkimmer;

pub mod native;
pub mod pair;
pub mod tls;

/// How long a process may take to become ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Default read timeout of helper connections: a hang shows as an error, never as a stuck test.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// Both io drivers, so a scenario can run on each.
pub fn drivers() -> [&'static str; 2] {
    ["io_uring", "epoll"]
}

/// Poll `f` every 20 ms until it returns true or `timeout` passes. Returns whether it did.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

static PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
static SEQ: AtomicU64 = AtomicU64::new(0);

/// A free TCP port on 127.0.0.1, never the same one twice in this test process.
pub fn free_port() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local_addr").port();
        drop(l);
        let mut g = PORTS.lock().unwrap_or_else(|e| e.into_inner());
        if g.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

/// A fresh file path in the cargo test temp directory.
/// `RESPLICA_TEST_IO_DRIVER=epoll cargo test` runs every sidecar the harness starts on that
/// io driver, unless its arguments or config (`config_text`) choose one themselves: the
/// epoll driver is what containers get, so the suite runs on it too (`.ci/run`).
pub fn io_driver_args(args: &[String], config_text: &str) -> Vec<String> {
    match std::env::var("RESPLICA_TEST_IO_DRIVER") {
        Ok(d) if !d.is_empty() && !args.iter().any(|a| a == "--io-driver") && !config_text.contains("io_driver") => {
            vec!["--io-driver".into(), d]
        }
        _ => Vec::new(),
    }
}

pub fn temp_path(prefix: &str, ext: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("resplica-it");
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("{prefix}-{}-{n}.{ext}", std::process::id()))
}

fn tail(path: &PathBuf, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: plain kill(2) on a child process id we own.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed: {}", std::io::Error::last_os_error());
}

/// Wait for a child to exit, at most `timeout`.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    status
}

/// Encode a command as a RESP multibulk.
pub fn encode<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A reply as text, for assertions and messages.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// ---------------------------------------------------------------------------------------
// Raw TCP
// ---------------------------------------------------------------------------------------

/// A plain TCP connection speaking raw RESP, reading whole replies with `ReplySkimmer`.
pub struct RawConn {
    pub stream: TcpStream,
    buf: BytesMut,
    skim: ReplySkimmer,
}

impl RawConn {
    pub fn connect(port: u16) -> RawConn {
        let stream =
            TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connect 127.0.0.1:{port}: {e}"));
        stream.set_nodelay(true).ok();
        RawConn { stream, buf: BytesMut::new(), skim: ReplySkimmer::new() }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to socket");
    }

    pub fn send_cmd<A: AsRef<[u8]>>(&mut self, args: &[A]) {
        let frame = encode(args);
        self.send(&frame);
    }

    /// Read exactly `n` complete replies within `timeout`.
    pub fn read_replies(&mut self, n: usize, timeout: Duration) -> Result<Vec<Bytes>, String> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        loop {
            while out.len() < n {
                match self.skim.next_reply(&mut self.buf) {
                    Ok(Some(r)) => out.push(r),
                    Ok(None) => break,
                    Err(e) => return Err(format!("bad reply after {} replies: {e}", out.len())),
                }
            }
            if out.len() == n {
                return Ok(out);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "timed out after {timeout:?} with {} of {n} replies (last: {:?}; {} bytes buffered)",
                    out.len(),
                    out.last().map(|r| text(&r[..r.len().min(200)])),
                    self.buf.len()
                ));
            }
            self.stream.set_read_timeout(Some(deadline - now)).ok();
            let mut chunk = vec![0u8; 256 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(format!(
                        "connection closed after {} of {n} replies (last: {:?})",
                        out.len(),
                        out.last().map(|r| text(&r[..r.len().min(200)]))
                    ))
                }
                Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
                Err(e) => return Err(format!("read error after {} of {n} replies: {e}", out.len())),
            }
        }
    }

    pub fn read_reply(&mut self, timeout: Duration) -> Result<Bytes, String> {
        self.read_replies(1, timeout).map(|mut v| v.remove(0))
    }

    /// Send one command and return its reply (panics on timeout).
    pub fn call<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Bytes {
        self.send_cmd(args);
        self.read_reply(IO_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Expect the peer to close with nothing more sent: `Ok` on EOF or reset.
    pub fn expect_eof(&mut self, timeout: Duration) -> Result<(), String> {
        if !self.buf.is_empty() {
            return Err(format!("unexpected data before close: {:?}", text(&self.buf)));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("connection still open after {timeout:?}"));
            }
            self.stream.set_read_timeout(Some(deadline - now)).ok();
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(()),
                Ok(k) => return Err(format!("unexpected data before close: {:?}", text(&chunk[..k]))),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
                Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => {
                    return Ok(())
                }
                Err(e) => return Err(format!("read error: {e}")),
            }
        }
    }

    /// Read and discard everything until the peer closes (EOF or reset). Returns the number of
    /// bytes read, or an error if the connection is still open after `timeout`.
    pub fn drain_until_closed(&mut self, timeout: Duration) -> Result<usize, String> {
        let mut total = self.buf.len();
        self.buf.clear();
        let deadline = Instant::now() + timeout;
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("connection still open after {timeout:?} ({total} bytes read)"));
            }
            self.stream.set_read_timeout(Some(deadline - now)).ok();
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(total),
                Ok(k) => total += k,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
                Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => {
                    return Ok(total)
                }
                Err(e) => return Err(format!("read error: {e}")),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// redis crate connections
// ---------------------------------------------------------------------------------------

/// A `redis` crate connection to 127.0.0.1:`port` (optionally with a password), with read and
/// write timeouts so a hang fails the test instead of stalling it.
pub fn redis_conn(port: u16, password: Option<&str>) -> redis::Connection {
    let url = match password {
        Some(pw) => format!("redis://:{pw}@127.0.0.1:{port}/"),
        None => format!("redis://127.0.0.1:{port}/"),
    };
    let client = redis::Client::open(url.as_str()).expect("redis client");
    let con = client.get_connection().unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"));
    con.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
    con.set_write_timeout(Some(IO_TIMEOUT)).expect("write timeout");
    con
}

// ---------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------

/// A `redis-server` child process on a free port.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    extra: Vec<String>,
    password: Option<String>,
    log: PathBuf,
    /// Its own working directory: a replica writes the RDB of a full sync there, and a Redis
    /// restarted in a shared directory would load another one's data.
    dir: PathBuf,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// Start with extra `redis-server` arguments (e.g. `["--requirepass", "pw"]`).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let password = extra.iter().position(|a| a == "--requirepass").and_then(|i| extra.get(i + 1)).cloned();
        let mut last_err = String::new();
        for _ in 0..3 {
            let port = free_port();
            let mut r = RedisServer {
                port,
                child: None,
                extra: extra.clone(),
                password: password.clone(),
                log: temp_path("redis", "log"),
                dir: temp_path("redis", "dir"),
            };
            match r.spawn() {
                Ok(()) => return r,
                Err(e) => last_err = e,
            }
        }
        panic!("redis-server would not start: {last_err}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("redis log file");
        // A restart starts empty, as a Redis without persistence does.
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir).expect("redis dir");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--protected-mode", "no"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot spawn redis-server: {e}"))?;
        self.child = Some(child);
        let port = self.port;
        let mut exited = None;
        let child = self.child.as_mut().unwrap();
        let up = wait_until(START_TIMEOUT, || {
            if let Ok(Some(st)) = child.try_wait() {
                exited = Some(st);
                return true;
            }
            redis_answers(port)
        });
        if let Some(st) = exited {
            self.child = None;
            return Err(format!("redis-server on port {port} exited with {st}: {}", tail(&self.log, 20)));
        }
        if !up {
            return Err(format!(
                "redis-server on port {port} not answering after {START_TIMEOUT:?}: {}",
                tail(&self.log, 20)
            ));
        }
        Ok(())
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis is not running").id()
    }

    /// A direct `redis` crate connection (with the server's password, if any).
    pub fn conn(&self) -> redis::Connection {
        redis_conn(self.port, self.password.as_deref())
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the process stays, its sockets stop being served.
    pub fn stop(&self) {
        signal(self.pid(), libc::SIGSTOP);
    }

    /// SIGCONT after `stop`.
    pub fn cont(&self) {
        signal(self.pid(), libc::SIGCONT);
    }

    /// Start again on the same port (after `kill`).
    pub fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.spawn() {
            panic!("redis restart failed: {e}");
        }
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log, 40)
    }
}

/// Whether something on `port` answers a PING with a RESP reply (PONG, or NOAUTH when a
/// password is required).
fn redis_answers(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_millis(500))).ok();
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(n) if n > 0 => b.starts_with(b"+PONG") || b.starts_with(b"-NOAUTH"),
        _ => false,
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_ref() {
            // A stopped process must be continued before it can die cleanly in all setups.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGCONT) };
        }
        if std::thread::panicking() {
            eprintln!(
                "---- redis-server :{} log (tail; kept at {}) ----\n{}",
                self.port,
                self.log.display(),
                self.log_tail()
            );
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------
// The proxy
// ---------------------------------------------------------------------------------------

/// A `resplica` child process.
pub struct Proxy {
    pub port: u16,
    child: Option<Child>,
    log: PathBuf,
    config: Option<PathBuf>,
    password: Option<String>,
}

impl Proxy {
    /// `resplica --listen 127.0.0.1:<free> --redis <redis> <extra...>`.
    pub fn start(redis: &RedisServer, extra: &[&str]) -> Proxy {
        let password =
            extra.iter().position(|a| *a == "--requirepass").and_then(|i| extra.get(i + 1)).map(|s| s.to_string());
        let mut args: Vec<String> = vec!["--redis".into(), redis.addr()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Proxy::launch(args, password)
    }

    /// `resplica --config <file with toml> --listen 127.0.0.1:<free>`. The TOML names the
    /// Redis address (`[redis] address = ...`); the listen address comes from the flag, which
    /// overrides the file.
    pub fn with_config(toml: &str) -> Proxy {
        let cfg =
            resplica::config::Config::from_toml(toml).unwrap_or_else(|e| panic!("test config is invalid: {e}\n{toml}"));
        let password = (!cfg.client.password.is_empty()).then(|| cfg.client.password.clone());
        let path = temp_path("resplica", "toml");
        std::fs::write(&path, toml).expect("write config");
        let mut p = Proxy::launch(vec!["--config".into(), path.display().to_string()], password);
        p.config = Some(path);
        p
    }

    /// [`Proxy::with_config`] for a TLS client port: readiness is probed on the plaintext
    /// port the TOML gives as `[node] plaintext_listen = "127.0.0.1:<probe_port>"`.
    pub fn with_tls_config(toml: &str, probe_port: u16) -> Proxy {
        resplica::config::Config::from_toml(toml).unwrap_or_else(|e| panic!("test config is invalid: {e}\n{toml}"));
        let path = temp_path("resplica", "toml");
        std::fs::write(&path, toml).expect("write config");
        let mut p = Proxy::launch_probing(vec!["--config".into(), path.display().to_string()], None, Some(probe_port));
        p.config = Some(path);
        p
    }

    fn launch(args: Vec<String>, password: Option<String>) -> Proxy {
        Proxy::launch_probing(args, password, None)
    }

    fn launch_probing(args: Vec<String>, password: Option<String>, probe_port: Option<u16>) -> Proxy {
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port();
            let log = temp_path("resplica", "log");
            let logf = std::fs::File::create(&log).expect("proxy log file");
            let config_text = args
                .iter()
                .position(|a| a == "--config")
                .and_then(|i| args.get(i + 1))
                .and_then(|path| std::fs::read_to_string(path).ok())
                .unwrap_or_default();
            let child = Command::new(env!("CARGO_BIN_EXE_resplica"))
                .args(&args)
                .args(io_driver_args(&args, &config_text))
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(logf)
                .spawn()
                .expect("spawn resplica");
            let mut p = Proxy { port, child: Some(child), log, config: None, password: password.clone() };
            match p.wait_ready(probe_port.unwrap_or(port)) {
                Ok(()) => return p,
                Err(e) => {
                    last = format!("{e}\nargs: {args:?}\nlog:\n{}", p.log_text());
                    p.kill();
                }
            }
        }
        panic!("resplica would not start: {last}");
    }

    /// Ready = the listener answers, and forwarded commands work on fresh connections in both
    /// protocols (the shared upstream connections of the cores are up).
    fn wait_ready(&mut self, port: u16) -> Result<(), String> {
        let pw = self.password.clone();
        let mut streak = 0;
        let mut exited = None;
        let child = self.child.as_mut().unwrap();
        let ok = wait_until(START_TIMEOUT, || {
            if let Ok(Some(st)) = child.try_wait() {
                exited = Some(st);
                return true;
            }
            if probe(port, pw.as_deref()) {
                streak += 1;
            } else {
                streak = 0;
            }
            streak >= 8
        });
        if let Some(st) = exited {
            return Err(format!("resplica exited during start with {st}"));
        }
        if !ok {
            return Err(format!("resplica on port {port} not ready after {START_TIMEOUT:?}"));
        }
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("proxy is not running").id()
    }

    /// A `redis` crate connection through the proxy (no password).
    pub fn conn(&self) -> redis::Connection {
        redis_conn(self.port, None)
    }

    pub fn raw(&self) -> RawConn {
        RawConn::connect(self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Replace the config file this proxy was started with (`with_config`) and send SIGHUP.
    pub fn reload_with(&self, toml: &str) {
        let path = self.config.as_ref().expect("proxy was not started with_config");
        std::fs::write(path, toml).expect("rewrite config");
        signal(self.pid(), libc::SIGHUP);
    }

    /// Send SIGTERM (graceful stop).
    pub fn terminate(&self) {
        signal(self.pid(), libc::SIGTERM);
    }

    /// Wait at most `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let c = self.child.as_mut().expect("proxy is not running");
        let st = wait_child(c, timeout);
        if st.is_some() {
            self.child = None;
        }
        st
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- resplica :{} log (tail; kept at {}) ----\n{}",
                self.port,
                self.log.display(),
                tail(&self.log, 60)
            );
        } else {
            let _ = std::fs::remove_file(&self.log);
            if let Some(c) = &self.config {
                let _ = std::fs::remove_file(c);
            }
        }
        self.kill();
    }
}

/// One readiness probe on a fresh connection.
fn probe(port: u16, password: Option<&str>) -> bool {
    let Ok(s) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)) else {
        return false;
    };
    s.set_nodelay(true).ok();
    let mut c = RawConn { stream: s, buf: BytesMut::new(), skim: ReplySkimmer::new() };
    let mut n = 0;
    let mut out = Vec::new();
    if let Some(pw) = password {
        out.extend(encode(&["AUTH", pw]));
        n += 1;
    }
    out.extend(encode(&["PING"]));
    out.extend(encode(&["EXISTS", "resplica-it:probe"]));
    out.extend(encode(&["HELLO", "3"]));
    out.extend(encode(&["EXISTS", "resplica-it:probe"]));
    n += 4;
    if c.stream.write_all(&out).is_err() {
        return false;
    }
    let Ok(replies) = c.read_replies(n, Duration::from_secs(2)) else { return false };
    let r = &replies[replies.len() - 4..];
    &r[0][..] == b"+PONG\r\n" && r[1].starts_with(b":") && r[2].starts_with(b"%7\r\n") && r[3].starts_with(b":")
}

/// Run the binary with a config file and collect its exit status and stderr (bounded wait).
pub fn run_with_config(toml: &str, extra: &[&str]) -> (ExitStatus, String) {
    let path = temp_path("bad", "toml");
    std::fs::write(&path, toml).expect("write config");
    let err = temp_path("bad", "log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_resplica"))
        .arg("--config")
        .arg(&path)
        .args(extra)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .expect("spawn resplica");
    let st = wait_child(&mut child, Duration::from_secs(10));
    let _ = std::fs::remove_file(&path);
    let Some(st) = st else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "resplica with config {toml:?} did not exit within 10 s; stderr: {}",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
    };
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    let _ = std::fs::remove_file(&err);
    (st, stderr)
}

/// Sum of the receive queues of Redis's established server-side sockets (bytes sent to Redis
/// and not yet read by it), from /proc/net/tcp.
/// Bytes this host's connections to `port` have not yet handed to the other side (their
/// send queues).
pub fn unsent_to(port: u16) -> u64 {
    tcp_queue_sum(port, Queue::SendToPort)
}

/// Bytes waiting in the receive queues of established connections to local port
/// `redis_port` (sent to that server and not yet read by it; any server's port works).
pub fn redis_unread_bytes(redis_port: u16) -> u64 {
    tcp_queue_sum(redis_port, Queue::ReceiveOnPort)
}

enum Queue {
    /// tx_queue of connections whose remote port is the port.
    SendToPort,
    /// rx_queue of connections whose local port is the port.
    ReceiveOnPort,
}

/// Sum one queue column of /proc/net/tcp over the established connections that match.
fn tcp_queue_sum(port: u16, which: Queue) -> u64 {
    let (addr_col, queue_half) = match which {
        Queue::SendToPort => (2, 0),
        Queue::ReceiveOnPort => (1, 1),
    };
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let mut total = 0;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 || f[3] != "01" {
            continue;
        }
        let Some(p) = f[addr_col].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()) else { continue };
        if p != port {
            continue;
        }
        if let Some(q) = f[4].split(':').nth(queue_half).and_then(|q| u64::from_str_radix(q, 16).ok()) {
            total += q;
        }
    }
    total
}

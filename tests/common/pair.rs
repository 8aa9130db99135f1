//! Pair-mode harness: two nodes (a `redis-server` and a `resplica` sidecar each) configured as
//! an active-active pair (spec/PAIR_INTERFACE.md), TCP relays that can cut the links between
//! the two sides while both stay alive, `RESPLICA STATUS` parsing, "pair in sync" polling and a
//! logical comparison of two Redis datasets.
//!
//! Node "a" has priority 100 (the preferred writer), node "b" priority 90. Every port is
//! chosen once, so a sidecar killed with SIGKILL restarts on the same ports with the same
//! configuration file.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{free_port, redis_conn, tail, temp_path, wait_child, wait_until, RedisServer, START_TIMEOUT};

/// How long a freshly started pair may take to elect a writer and sync.
pub const PAIR_START_TIMEOUT: Duration = Duration::from_secs(20);
/// Default bound for "the pair is in sync again" after a disturbance.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// LinkRelay
// ---------------------------------------------------------------------------------------

struct RelayShared {
    target: u16,
    cut: AtomicBool,
    /// `blackhole`: connections stay open but no byte moves either way (as when every packet
    /// is dropped); held bytes flow again on `restore`, as TCP's retransmissions would.
    blackhole: AtomicBool,
    stop: AtomicBool,
    next_id: AtomicU64,
    /// Both sockets of every forwarded connection, so `cut` can close them.
    conns: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
    /// Connections accepted and forwarded since the start.
    forwarded: AtomicU64,
}

/// A TCP forwarder on a free port of 127.0.0.1 in front of `127.0.0.1:target`. `cut` closes
/// every forwarded connection and closes new ones as soon as they are accepted (a link that is
/// down while both ends stay alive); `heal` forwards again. `blackhole` keeps every socket open
/// but stops moving bytes in both directions, and leaves new connections unanswered (a network
/// that drops packets: the ends only learn of it by their own timeouts); `restore` delivers
/// what was held and forwards again.
pub struct LinkRelay {
    pub port: u16,
    pub target: u16,
    shared: Arc<RelayShared>,
    accept: Option<JoinHandle<()>>,
}

impl LinkRelay {
    pub fn start(target: u16) -> LinkRelay {
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(listener) => {
                    let shared = Arc::new(RelayShared {
                        target,
                        cut: AtomicBool::new(false),
                        blackhole: AtomicBool::new(false),
                        stop: AtomicBool::new(false),
                        next_id: AtomicU64::new(0),
                        conns: Mutex::new(HashMap::new()),
                        forwarded: AtomicU64::new(0),
                    });
                    let s = shared.clone();
                    let accept = std::thread::Builder::new()
                        .name(format!("relay-{port}-{target}"))
                        .spawn(move || relay_accept(listener, s))
                        .expect("spawn relay thread");
                    return LinkRelay { port, target, shared, accept: Some(accept) };
                }
                Err(e) => last = e.to_string(),
            }
        }
        panic!("relay could not bind a port: {last}");
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Close every forwarded connection; close new ones on accept until `heal`.
    pub fn cut(&self) {
        let mut g = self.shared.conns.lock().unwrap_or_else(|e| e.into_inner());
        self.shared.cut.store(true, Ordering::SeqCst);
        for (_, (a, b)) in g.drain() {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    pub fn heal(&self) {
        let _g = self.shared.conns.lock().unwrap_or_else(|e| e.into_inner());
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// Stop forwarding bytes in both directions, keeping every socket open; connections
    /// accepted meanwhile are not connected upstream until `restore`.
    pub fn blackhole(&self) {
        self.shared.blackhole.store(true, Ordering::SeqCst);
    }

    /// Forward again after `blackhole` (bytes held meanwhile are delivered in order).
    pub fn restore(&self) {
        self.shared.blackhole.store(false, Ordering::SeqCst);
    }

    pub fn is_blackholed(&self) -> bool {
        self.shared.blackhole.load(Ordering::SeqCst)
    }

    pub fn is_cut(&self) -> bool {
        self.shared.cut.load(Ordering::SeqCst)
    }

    /// Connections currently forwarded.
    pub fn live_connections(&self) -> usize {
        self.shared.conns.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Connections forwarded since the start.
    pub fn forwarded_total(&self) -> u64 {
        self.shared.forwarded.load(Ordering::SeqCst)
    }
}

fn relay_accept(listener: TcpListener, shared: Arc<RelayShared>) {
    for incoming in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = incoming else { continue };
        if shared.cut.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        if shared.blackhole.load(Ordering::SeqCst) {
            // Unanswered until `restore` (or closed by `cut` / drop).
            let s = shared.clone();
            let _ = std::thread::Builder::new().name("relay-held".into()).spawn(move || {
                if hold_while_blackholed(&s) {
                    relay_connect(client, s);
                } else {
                    let _ = client.shutdown(Shutdown::Both);
                }
            });
            continue;
        }
        relay_connect(client, shared.clone());
    }
}

/// Wait while the relay is blackholed; `false` when it was cut or stopped meanwhile.
fn hold_while_blackholed(shared: &RelayShared) -> bool {
    while shared.blackhole.load(Ordering::SeqCst) {
        if shared.cut.load(Ordering::SeqCst) || shared.stop.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    !shared.cut.load(Ordering::SeqCst) && !shared.stop.load(Ordering::SeqCst)
}

/// Connect an accepted client to the target and start forwarding both ways.
fn relay_connect(client: TcpStream, shared: Arc<RelayShared>) {
    let Ok(upstream) = TcpStream::connect_timeout(&([127, 0, 0, 1], shared.target).into(), Duration::from_millis(500))
    else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    client.set_nodelay(true).ok();
    upstream.set_nodelay(true).ok();
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let (Ok(c2), Ok(u2), Ok(c3), Ok(u3)) =
        (client.try_clone(), upstream.try_clone(), client.try_clone(), upstream.try_clone())
    else {
        return;
    };
    {
        let mut g = shared.conns.lock().unwrap_or_else(|e| e.into_inner());
        // Checked under the lock `cut` takes: a connection is either registered before the
        // cut (and closed by it) or refused here.
        if shared.cut.load(Ordering::SeqCst) || shared.stop.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
            return;
        }
        g.insert(id, (c3, u3));
    }
    shared.forwarded.fetch_add(1, Ordering::SeqCst);
    let s1 = shared.clone();
    let s2 = shared.clone();
    let _ = std::thread::Builder::new().name("relay-up".into()).spawn(move || pump(client, upstream, id, s1));
    let _ = std::thread::Builder::new().name("relay-down".into()).spawn(move || pump(u2, c2, id, s2));
}

fn pump(mut from: TcpStream, mut to: TcpStream, id: u64, shared: Arc<RelayShared>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                // Blackholed: hold these bytes (and read no more) until restored.
                if !hold_while_blackholed(&shared) || to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
    shared.conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
}

impl Drop for LinkRelay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.cut();
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect_timeout(&([127, 0, 0, 1], self.port).into(), Duration::from_millis(200));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Status
// ---------------------------------------------------------------------------------------

/// One `peer:` or `replica:` line: the id, then `key=value` attributes.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    pub id: String,
    pub attrs: HashMap<String, String>,
}

impl Entry {
    /// The attribute, or "" when missing.
    pub fn get(&self, k: &str) -> &str {
        self.attrs.get(k).map(|s| s.as_str()).unwrap_or("")
    }

    /// The attribute as a number (-1 when missing or not a number).
    pub fn num(&self, k: &str) -> i64 {
        self.get(k).parse().unwrap_or(-1)
    }
}

/// `RESPLICA STATUS` text, parsed.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub raw: String,
    pub fields: HashMap<String, String>,
    pub peers: Vec<Entry>,
    pub replicas: Vec<Entry>,
}

impl Status {
    /// A `key:value` field, or "" when missing.
    pub fn get(&self, k: &str) -> &str {
        self.fields.get(k).map(|s| s.as_str()).unwrap_or("")
    }

    /// A field as a number (-1 when missing or not a number).
    pub fn num(&self, k: &str) -> i64 {
        self.get(k).parse().unwrap_or(-1)
    }

    pub fn role(&self) -> &str {
        self.get("role")
    }

    pub fn replica(&self, id: &str) -> Option<&Entry> {
        self.replicas.iter().find(|e| e.id == id)
    }

    pub fn peer(&self, id: &str) -> Option<&Entry> {
        self.peers.iter().find(|e| e.id == id)
    }
}

/// Parse status text: `key:value` lines; `peer:` and `replica:` lines hold an id and
/// `key=value` attributes. A trailing `# comment` is ignored.
pub fn parse_status(text: &str) -> Status {
    let mut st = Status { raw: text.to_string(), ..Status::default() };
    for line in text.lines() {
        let line = match line.find(" #") {
            Some(i) => &line[..i],
            None => line,
        };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once(':') else { continue };
        let v = v.trim();
        if k == "peer" || k == "replica" {
            let mut it = v.split_whitespace();
            let id = it.next().unwrap_or("").to_string();
            let attrs = it.filter_map(|kv| kv.split_once('=')).map(|(a, b)| (a.to_string(), b.to_string())).collect();
            let e = Entry { id, attrs };
            if k == "peer" {
                st.peers.push(e);
            } else {
                st.replicas.push(e);
            }
        } else {
            st.fields.insert(k.to_string(), v.to_string());
        }
    }
    st
}

/// `RESPLICA STATUS` on a client port (short timeouts: an unreachable node is an `Err`).
pub fn status(port: u16) -> Result<Status, String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).map_err(|e| e.to_string())?;
    let mut con =
        client.get_connection_with_timeout(Duration::from_millis(1000)).map_err(|e| format!(":{port}: {e}"))?;
    con.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
    con.set_write_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
    let text: String =
        redis::cmd("RESPLICA").arg("STATUS").query(&mut con).map_err(|e| format!(":{port} RESPLICA STATUS: {e}"))?;
    Ok(parse_status(&text))
}

/// Run `resplica <args>` with a bounded wait: (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], timeout: Duration) -> (Option<i32>, String, String) {
    let out = temp_path("cli", "out");
    let err = temp_path("cli", "err");
    let mut child = Command::new(env!("CARGO_BIN_EXE_resplica"))
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .expect("spawn resplica");
    let st = wait_child(&mut child, timeout);
    if st.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let o = std::fs::read_to_string(&out).unwrap_or_default();
    let e = std::fs::read_to_string(&err).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_file(&err);
    match st {
        Some(st) => (st.code(), o, e),
        None => (None, o, format!("{e}\n(did not exit within {timeout:?}; killed)")),
    }
}

/// `resplica status --admin ADDR`, parsed (an `Err` holds the exit code and output).
pub fn admin_status(addr: &str) -> Result<Status, String> {
    let (code, out, err) = run_cli(&["status", "--admin", addr], Duration::from_secs(10));
    if code == Some(0) {
        Ok(parse_status(&out))
    } else {
        Err(format!("`resplica status --admin {addr}` exited with {code:?}; stdout: {out:?}; stderr: {err:?}"))
    }
}

// ---------------------------------------------------------------------------------------
// Node
// ---------------------------------------------------------------------------------------

/// One side of the pair: its Redis, and its sidecar (which can be killed and restarted with
/// the same configuration file and ports).
pub struct Node {
    pub id: String,
    pub priority: u32,
    /// Client port of the sidecar.
    pub port: u16,
    pub peer_port: u16,
    pub admin_port: u16,
    pub config_text: String,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    pub redis: RedisServer,
}

impl Node {
    pub fn admin_addr(&self) -> String {
        format!("127.0.0.1:{}", self.admin_port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Start the sidecar process without waiting for it.
    pub fn spawn_proxy(&mut self) {
        assert!(self.child.is_none(), "node {}: sidecar already running", self.id);
        let logf = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("node log file");
        let _ = writeln!(&logf, "===== starting resplica node {} at {:?} =====", self.id, SystemTime::now());
        let child = Command::new(env!("CARGO_BIN_EXE_resplica"))
            .arg("--config")
            .arg(&self.config)
            .args(super::io_driver_args(&[], &self.config_text))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn resplica");
        self.child = Some(child);
    }

    /// Ready = the client port answers PING with any RESP reply (the role may still be
    /// "starting"; `Pair::wait_in_sync` waits for the rest).
    pub fn wait_proxy_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let port = self.port;
        let mut exited = None;
        let child = self.child.as_mut().ok_or("sidecar not started")?;
        let ok = wait_until(timeout, || {
            if let Ok(Some(st)) = child.try_wait() {
                exited = Some(st);
                return true;
            }
            answers_ping(port)
        });
        if let Some(st) = exited {
            self.child = None;
            return Err(format!("node {}: resplica exited during start with {st}\n{}", self.id, self.log_tail(40)));
        }
        if !ok {
            return Err(format!("node {}: resplica on :{port} not answering after {timeout:?}", self.id));
        }
        Ok(())
    }

    /// Start the sidecar and wait until its client port answers.
    pub fn start_proxy(&mut self) {
        self.spawn_proxy();
        if let Err(e) = self.wait_proxy_ready(START_TIMEOUT) {
            panic!("{e}");
        }
    }

    /// SIGKILL the sidecar, and reap it.
    pub fn kill_proxy(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM the sidecar (graceful: drain, then stop) and wait at most `timeout` for it to
    /// exit; its exit status.
    pub fn terminate_proxy(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        super::signal(c.id(), libc::SIGTERM);
        let st = super::wait_child(&mut c, timeout);
        if st.is_none() {
            let _ = c.kill();
            let _ = c.wait();
        }
        st
    }

    /// SIGSTOP the sidecar: alive but frozen (a stalled process, not a dead one).
    pub fn freeze_proxy(&self) {
        super::signal(self.proxy_pid(), libc::SIGSTOP);
    }

    /// SIGCONT after `freeze_proxy`.
    pub fn thaw_proxy(&self) {
        super::signal(self.proxy_pid(), libc::SIGCONT);
    }

    pub fn proxy_pid(&self) -> u32 {
        self.child.as_ref().expect("sidecar is not running").id()
    }

    pub fn proxy_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// A `redis` crate connection through the sidecar.
    pub fn conn(&self) -> redis::Connection {
        redis_conn(self.port, None)
    }

    /// A connection through the sidecar with short timeouts, or the error.
    pub fn try_conn(&self, timeout: Duration) -> redis::RedisResult<redis::Connection> {
        conn_with_timeout(self.port, timeout)
    }

    /// A direct connection to this node's Redis.
    pub fn redis_conn(&self) -> redis::Connection {
        self.redis.conn()
    }

    pub fn status(&self) -> Result<Status, String> {
        status(self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- resplica node {} (:{}) log (tail; kept at {}) ----\n{}",
                self.id,
                self.port,
                self.log.display(),
                tail(&self.log, 80)
            );
        } else if std::env::var_os("RESPLICA_IT_KEEP_LOGS").is_some() {
            eprintln!("resplica node {} log kept at {}", self.id, self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
            let _ = std::fs::remove_file(&self.config);
        }
        self.kill_proxy();
    }
}

/// A `redis` crate connection with connect, read and write timeouts.
pub fn conn_with_timeout(port: u16, timeout: Duration) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let con = client.get_connection_with_timeout(timeout)?;
    con.set_read_timeout(Some(timeout))?;
    con.set_write_timeout(Some(timeout))?;
    Ok(con)
}

fn answers_ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_millis(1000))).ok();
    if s.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
        return false;
    }
    let mut b = [0u8; 64];
    matches!(s.read(&mut b), Ok(n) if n > 0 && matches!(b[0], b'+' | b'-'))
}

// ---------------------------------------------------------------------------------------
// Pair
// ---------------------------------------------------------------------------------------

/// Options of a test pair.
#[derive(Debug, Clone)]
pub struct PairOpts {
    /// `[replication] mode`: "mirror" (the default here: the existing pair tests prove the
    /// sequencer) or "native".
    pub mode: &'static str,
    /// "all" or "local".
    pub write_ack: &'static str,
    pub failover_timeout_ms: u64,
    pub backlog_bytes: String,
    pub threads: usize,
    pub secret: String,
    /// Route each side's links to the other side (its peer_listen and its Redis) through a
    /// `LinkRelay`, so the test can cut them.
    pub relays: bool,
    /// `[node] io_driver` of both nodes (the default when `None`).
    pub io_driver: Option<&'static str>,
    /// A different secret for node b (to test that the peer link refuses it).
    pub b_secret: Option<String>,
    /// `[node] drain_ms` of both nodes.
    pub drain_ms: u64,
    /// `[replication] min_replicas_to_write` of both nodes (native mode).
    pub min_replicas_to_write: u32,
    /// Both Redis require this password (`requirepass`), given to the sidecars as
    /// `[redis] password`.
    pub redis_password: Option<String>,
    /// TOML appended to both nodes' configuration (e.g. a `[replication.tls]` table).
    pub extra_toml: String,
}

impl Default for PairOpts {
    fn default() -> Self {
        PairOpts {
            mode: "mirror",
            write_ack: "all",
            failover_timeout_ms: 500,
            backlog_bytes: "256MiB".into(),
            threads: 2,
            secret: "pair-test-secret".into(),
            relays: false,
            io_driver: None,
            b_secret: None,
            drain_ms: 0,
            min_replicas_to_write: 0,
            redis_password: None,
            extra_toml: String::new(),
        }
    }
}

/// The relays of a pair started with `relays: true`: what each side uses to reach the other.
pub struct Relays {
    /// a → b's peer_listen.
    pub a_to_b_peer: LinkRelay,
    /// a → b's Redis.
    pub a_to_b_redis: LinkRelay,
    /// b → a's peer_listen.
    pub b_to_a_peer: LinkRelay,
    /// b → a's Redis.
    pub b_to_a_redis: LinkRelay,
}

impl Relays {
    pub fn all(&self) -> [&LinkRelay; 4] {
        [&self.a_to_b_peer, &self.a_to_b_redis, &self.b_to_a_peer, &self.b_to_a_redis]
    }
}

/// Two nodes, "a" (priority 100) and "b" (priority 90).
pub struct Pair {
    pub a: Node,
    pub b: Node,
    pub opts: PairOpts,
    /// Declared last: dropped after the nodes.
    pub relays: Option<Relays>,
}

struct Ports {
    client: u16,
    peer: u16,
    admin: u16,
}

#[allow(clippy::too_many_arguments)]
fn node_toml(
    opts: &PairOpts,
    secret: &str,
    id: &str,
    priority: u32,
    me: &Ports,
    my_redis: u16,
    peer_id: &str,
    peer_addr: u16,
    peer_redis: u16,
) -> String {
    let driver = opts.io_driver.map(|d| format!("io_driver = \"{d}\"\n")).unwrap_or_default();
    format!(
        "[node]\n\
         {driver}\
         id = \"{id}\"\n\
         priority = {priority}\n\
         listen = \"127.0.0.1:{}\"\n\
         peer_listen = \"127.0.0.1:{}\"\n\
         admin_listen = \"127.0.0.1:{}\"\n\
         threads = {}\n\
         drain_ms = {}\n\
         [redis]\n\
         address = \"127.0.0.1:{my_redis}\"\n\
         password = \"{}\"\n\
         [[peers]]\n\
         id = \"{peer_id}\"\n\
         address = \"127.0.0.1:{peer_addr}\"\n\
         redis = \"127.0.0.1:{peer_redis}\"\n\
         [replication]\n\
         mode = \"{}\"\n\
         write_ack = \"{}\"\n\
         failover_timeout_ms = {}\n\
         min_replicas_to_write = {}\n\
         backlog_bytes = \"{}\"\n\
         secret = \"{}\"\n\
         {}",
        me.client,
        me.peer,
        me.admin,
        opts.threads,
        opts.drain_ms,
        opts.redis_password.as_deref().unwrap_or(""),
        opts.mode,
        opts.write_ack,
        opts.failover_timeout_ms,
        opts.min_replicas_to_write,
        opts.backlog_bytes,
        secret,
        opts.extra_toml
    )
}

impl Pair {
    /// A pair with the default options (write_ack = all, failover 500 ms, no relays).
    pub fn start() -> Pair {
        Pair::start_with(PairOpts::default())
    }

    /// Start both Redis, both sidecars, and wait until the pair is in sync.
    pub fn start_with(opts: PairOpts) -> Pair {
        let pair = Pair::start_unsynced(opts);
        pair.wait_in_sync(PAIR_START_TIMEOUT);
        pair
    }

    /// Start everything and wait until both client ports answer, but not for sync.
    pub fn start_unsynced(opts: PairOpts) -> Pair {
        let mut pair = Pair::prepare(opts);
        pair.a.spawn_proxy();
        pair.b.spawn_proxy();
        for n in [&mut pair.a, &mut pair.b] {
            if let Err(e) = n.wait_proxy_ready(START_TIMEOUT) {
                panic!("{e}\nconfig:\n{}", n.config_text);
            }
        }
        pair
    }

    /// Start both Redis (and the relays) and write both configurations, but start no sidecar
    /// (`Node::spawn_proxy` / `start_proxy` do).
    pub fn prepare(opts: PairOpts) -> Pair {
        let redis = || match &opts.redis_password {
            Some(pw) => RedisServer::start_with(&["--requirepass", pw]),
            None => RedisServer::start(),
        };
        let (ra, rb) = (redis(), redis());
        let pa = Ports { client: free_port(), peer: free_port(), admin: free_port() };
        let pb = Ports { client: free_port(), peer: free_port(), admin: free_port() };
        let relays = opts.relays.then(|| Relays {
            a_to_b_peer: LinkRelay::start(pb.peer),
            a_to_b_redis: LinkRelay::start(rb.port),
            b_to_a_peer: LinkRelay::start(pa.peer),
            b_to_a_redis: LinkRelay::start(ra.port),
        });
        let (a_sees_b_peer, a_sees_b_redis, b_sees_a_peer, b_sees_a_redis) = match &relays {
            Some(r) => (r.a_to_b_peer.port, r.a_to_b_redis.port, r.b_to_a_peer.port, r.b_to_a_redis.port),
            None => (pb.peer, rb.port, pa.peer, ra.port),
        };
        let ta = node_toml(&opts, &opts.secret, "a", 100, &pa, ra.port, "b", a_sees_b_peer, a_sees_b_redis);
        let tb = node_toml(
            &opts,
            opts.b_secret.as_deref().unwrap_or(&opts.secret),
            "b",
            90,
            &pb,
            rb.port,
            "a",
            b_sees_a_peer,
            b_sees_a_redis,
        );
        let mk = |id: &str, priority: u32, p: &Ports, text: String, redis: RedisServer| {
            let config = temp_path(&format!("pair-{id}"), "toml");
            std::fs::write(&config, &text).expect("write config");
            Node {
                id: id.into(),
                priority,
                port: p.client,
                peer_port: p.peer,
                admin_port: p.admin,
                config_text: text,
                config,
                log: temp_path(&format!("pair-{id}"), "log"),
                child: None,
                redis,
            }
        };
        Pair { a: mk("a", 100, &pa, ta, ra), b: mk("b", 90, &pb, tb, rb), opts, relays }
    }

    pub fn nodes(&self) -> [&Node; 2] {
        [&self.a, &self.b]
    }

    pub fn node(&self, id: &str) -> &Node {
        match id {
            "a" => &self.a,
            "b" => &self.b,
            other => panic!("no node {other:?}"),
        }
    }

    pub fn relays(&self) -> &Relays {
        self.relays.as_ref().expect("pair started without relays (PairOpts::relays)")
    }

    /// Cut every link between the two sides (sidecar↔sidecar and sidecar→other Redis).
    pub fn cut_links(&self) {
        for r in self.relays().all() {
            r.cut();
        }
    }

    /// Cut only the sidecar↔sidecar link; each sidecar still reaches the other's Redis.
    pub fn cut_peer_links(&self) {
        let r = self.relays();
        r.a_to_b_peer.cut();
        r.b_to_a_peer.cut();
    }

    pub fn heal_links(&self) {
        for r in self.relays().all() {
            r.heal();
        }
    }

    /// Drop every byte between the two sides (sidecar↔sidecar and sidecar/Redis→other Redis)
    /// while every socket stays open: a partition that drops packets (`LinkRelay::blackhole`).
    pub fn blackhole_links(&self) {
        for r in self.relays().all() {
            r.blackhole();
        }
    }

    /// End `blackhole_links`: held bytes are delivered and forwarding resumes.
    pub fn restore_links(&self) {
        for r in self.relays().all() {
            r.restore();
        }
    }

    /// Status of every node whose sidecar is running (an unreachable one shows as `Err`).
    pub fn statuses(&self) -> Vec<(String, Result<Status, String>)> {
        self.nodes().iter().filter(|n| n.child.is_some()).map(|n| (n.id.clone(), n.status())).collect()
    }

    /// Every running node's status text, for failure messages.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for (id, st) in self.statuses() {
            match st {
                Ok(s) => out.push_str(&format!("--- status of {id} ---\n{}\n", s.raw.trim_end())),
                Err(e) => out.push_str(&format!("--- status of {id}: {e}\n")),
            }
        }
        out
    }

    /// `Ok(writer id)` when the pair is in sync: exactly one running node is the writer; its
    /// status has a `replica:` line for each node, each `state=in_sync backlog_entries=0`; every
    /// other running node is a follower of that writer. `Err` says what is missing.
    pub fn check_in_sync(&self) -> Result<String, String> {
        let sts = self.statuses();
        let mut ok = Vec::new();
        for (id, s) in &sts {
            match s {
                Ok(s) => ok.push((id.clone(), s.clone())),
                Err(e) => return Err(format!("node {id}: {e}")),
            }
        }
        let writers: Vec<&(String, Status)> = ok.iter().filter(|(_, s)| s.role() == "writer").collect();
        if writers.len() != 1 {
            return Err(format!(
                "{} writers: {:?}",
                writers.len(),
                ok.iter().map(|(id, s)| format!("{id}={}", s.role())).collect::<Vec<_>>()
            ));
        }
        let (w, ws) = writers[0];
        for n in self.nodes() {
            let Some(r) = ws.replica(&n.id) else {
                return Err(format!("writer {w} has no replica line for {}", n.id));
            };
            if r.get("state") != "in_sync" || r.get("backlog_entries") != "0" {
                return Err(format!(
                    "writer {w}: replica {} state={} backlog_entries={}",
                    n.id,
                    r.get("state"),
                    r.get("backlog_entries")
                ));
            }
        }
        for (id, s) in &ok {
            if id != w && (s.role() != "follower" || s.get("writer") != w) {
                return Err(format!("node {id}: role={} writer={} (writer is {w})", s.role(), s.get("writer")));
            }
            // The follower knows its Redis is in sync (it reads locally; after a failover it
            // may be the reference copy).
            if s.get("local_in_sync") != "1" {
                return Err(format!("node {id}: local_in_sync={}", s.get("local_in_sync")));
            }
        }
        Ok(w.clone())
    }

    /// Wait for `check_in_sync`; panic with every status on timeout. Returns the writer's id.
    pub fn wait_in_sync(&self, timeout: Duration) -> String {
        let start = Instant::now();
        let mut last = Err(String::new());
        let ok = wait_until(timeout, || {
            last = self.check_in_sync();
            last.is_ok()
        });
        if !ok {
            panic!("pair not in sync after {timeout:?}: {}\n{}", last.err().unwrap_or_default(), self.dump());
        }
        eprintln!("pair in sync after {:?} (writer {})", start.elapsed(), last.as_ref().unwrap());
        last.unwrap()
    }

    /// Wait until node `id` reports `role`; panic with every status on timeout. Returns the
    /// time it took.
    pub fn wait_role(&self, id: &str, role: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        let n = self.node(id);
        let ok = wait_until(timeout, || n.status().is_ok_and(|s| s.role() == role));
        assert!(ok, "node {id} did not report role:{role} within {timeout:?}\n{}", self.dump());
        start.elapsed()
    }

    /// Wait for sync, then for the two Redis to hold the same data (bounded); panic with the
    /// differences otherwise. Notes when the data matched only some time after sync was
    /// reported.
    pub fn assert_converged(&self) {
        self.wait_in_sync(SYNC_TIMEOUT);
        let first = data_diff(&snapshot(self.a.redis.port), &snapshot(self.b.redis.port), 5);
        if first.is_empty() {
            return;
        }
        let t = Instant::now();
        let mut diff = first.clone();
        let same = wait_until(Duration::from_secs(5), || {
            diff = data_diff(&snapshot(self.a.redis.port), &snapshot(self.b.redis.port), 5);
            diff.is_empty()
        });
        assert!(
            same,
            "the pair reports in sync but the two Redis differ (a :{}, b :{}):\n{}\n{}",
            self.a.redis.port,
            self.b.redis.port,
            diff.join("\n"),
            self.dump()
        );
        eprintln!(
            "NOTE: data matched only {:?} after the pair reported in sync; differences at that moment:\n{}",
            t.elapsed(),
            first.join("\n")
        );
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- pair status at failure ----\n{}", self.dump());
        }
    }
}

/// `Pair::wait_in_sync`, as a function.
pub fn wait_in_sync(pair: &Pair, timeout: Duration) -> String {
    pair.wait_in_sync(timeout)
}

// ---------------------------------------------------------------------------------------
// Comparing datasets
// ---------------------------------------------------------------------------------------

/// One key's logical content.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyValue {
    pub kind: String,
    pub content: String,
    /// PEXPIRETIME: absolute Unix ms, or -1 for no expiry.
    pub expire_at: i64,
}

/// (db, key) → content.
pub type Snapshot = BTreeMap<(i64, Vec<u8>), KeyValue>;

fn show(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    if s.chars().all(|c| !c.is_control()) {
        s.into_owned()
    } else {
        format!("{:?}", s)
    }
}

fn join_items(items: &[Vec<u8>]) -> String {
    format!("[{}]", items.iter().map(|i| show(i)).collect::<Vec<_>>().join(", "))
}

/// Dbs that hold keys, from INFO keyspace.
pub fn keyspace_dbs(con: &mut redis::Connection) -> Vec<i64> {
    let info: String = redis::cmd("INFO").arg("keyspace").query(con).expect("INFO keyspace");
    info.lines()
        .filter_map(|l| l.strip_prefix("db"))
        .filter_map(|l| l.split(':').next())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// Every key of every db with keys on the Redis at `port`, read directly.
pub fn snapshot(port: u16) -> Snapshot {
    let mut con = redis_conn(port, None);
    let mut out = Snapshot::new();
    for db in keyspace_dbs(&mut con) {
        let _: () = redis::cmd("SELECT").arg(db).query(&mut con).expect("SELECT");
        let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(&mut con).expect("KEYS");
        for key in keys {
            let kind: String = redis::cmd("TYPE").arg(&key).query(&mut con).expect("TYPE");
            let q = |c: &str, extra: &[&str], con: &mut redis::Connection| -> Vec<Vec<u8>> {
                redis::cmd(c).arg(&key).arg(extra).query(con).unwrap_or_else(|e| panic!("{c} {}: {e}", show(&key)))
            };
            let content = match kind.as_str() {
                "none" => continue, // expired or deleted meanwhile
                "string" => {
                    let v: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query(&mut con).expect("GET");
                    v.map(|v| show(&v)).unwrap_or_else(|| "(nil)".into())
                }
                "list" => join_items(&q("LRANGE", &["0", "-1"], &mut con)),
                "set" => {
                    let mut m = q("SMEMBERS", &[], &mut con);
                    m.sort();
                    join_items(&m)
                }
                "zset" => {
                    let m = q("ZRANGE", &["0", "-1", "WITHSCORES"], &mut con);
                    let pairs: Vec<String> = m.chunks(2).map(|p| format!("{}={}", show(&p[0]), show(&p[1]))).collect();
                    format!("[{}]", pairs.join(", "))
                }
                "hash" => {
                    let m = q("HGETALL", &[], &mut con);
                    let mut pairs: Vec<String> =
                        m.chunks(2).map(|p| format!("{}={}", show(&p[0]), show(&p[1]))).collect();
                    pairs.sort();
                    format!("{{{}}}", pairs.join(", "))
                }
                "stream" => {
                    let v: redis::Value =
                        redis::cmd("XRANGE").arg(&key).arg("-").arg("+").query(&mut con).expect("XRANGE");
                    format!("{v:?}")
                }
                _ => {
                    let v: Vec<u8> = redis::cmd("DUMP").arg(&key).query(&mut con).expect("DUMP");
                    format!("dump {:?}", v)
                }
            };
            let expire_at: i64 = redis::cmd("PEXPIRETIME").arg(&key).query(&mut con).expect("PEXPIRETIME");
            if expire_at == -2 {
                continue;
            }
            out.insert((db, key), KeyValue { kind, content, expire_at });
        }
    }
    out
}

fn clip(s: &str) -> String {
    if s.len() <= 300 {
        s.to_string()
    } else {
        let mut end = 300;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}… ({} bytes)", &s[..end], s.len())
    }
}

fn show_kv(v: Option<&KeyValue>) -> String {
    match v {
        None => "(missing)".into(),
        Some(v) => {
            let ttl = if v.expire_at < 0 { "no ttl".to_string() } else { format!("expires at {} ms", v.expire_at) };
            format!("{} {} ({ttl})", v.kind, clip(&v.content))
        }
    }
}

/// Expiry times may differ by this much (clocks are the same; the shipping is not instant).
pub const TTL_TOLERANCE_MS: i64 = 2000;

/// The differences between two snapshots: a summary line, then up to `max` differing keys.
/// Empty when they hold the same data.
pub fn data_diff(a: &Snapshot, b: &Snapshot, max: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut n = 0;
    let (mut only_a, mut only_b, mut differ) = (0, 0, 0);
    let keys: std::collections::BTreeSet<&(i64, Vec<u8>)> = a.keys().chain(b.keys()).collect();
    for k in keys {
        let (va, vb) = (a.get(k), b.get(k));
        let same = match (va, vb) {
            (Some(x), Some(y)) => {
                x.kind == y.kind
                    && x.content == y.content
                    && (x.expire_at < 0) == (y.expire_at < 0)
                    && (x.expire_at - y.expire_at).abs() <= TTL_TOLERANCE_MS
            }
            _ => false,
        };
        if same {
            continue;
        }
        match (va, vb) {
            (Some(_), None) => only_a += 1,
            (None, Some(_)) => only_b += 1,
            _ => differ += 1,
        }
        n += 1;
        if n <= max {
            lines.push(format!("  db{} {:?}:\n    a: {}\n    b: {}", k.0, show(&k.1), show_kv(va), show_kv(vb)));
        }
    }
    if n > 0 {
        lines.insert(
            0,
            format!(
                "{n} keys differ ({only_a} only on a, {only_b} only on b, {differ} on both with different content; a has {} keys, b has {})",
                a.len(),
                b.len()
            ),
        );
    }
    lines
}

/// Panic, listing the first differing keys with both values, unless the two Redis hold the
/// same logical data (every key of every db: type, content, expiry class and time).
pub fn assert_same_data(a: &RedisServer, b: &RedisServer) {
    let diff = data_diff(&snapshot(a.port), &snapshot(b.port), 5);
    assert!(diff.is_empty(), "Redis :{} and :{} differ:\n{}", a.port, b.port, diff.join("\n"));
}

/// Unix time in ms.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as i64
}

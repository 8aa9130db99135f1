//! The runtime shell: monoio runtimes, one per runtime thread, each accepting on the client port with
//! SO_REUSEPORT and owning its clients, its shared upstream connections ("lanes") and the
//! clients' dedicated upstream connections. Everything protocol-shaped is decided in `resp`,
//! `command` and `session`; this module only moves bytes and keeps time.
//!
//! Cores talk through `CoreMsg` channels (a write whose sequencer is another core hops there
//! and its reply hops back), batched per destination and event-loop turn. No locks on the
//! data path.

mod admin;
mod client;
mod conn;
mod handshake;
mod io;
mod lane;
mod native;
mod peer;
mod replica;
mod signal;
mod sink;
mod stall;
mod upstream;

use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use std::{cell::RefCell, collections::HashMap};

use bytes::Bytes;
use monoio::net::{ListenerOpts, TcpListener};
use tracing::{error, info, warn};

use crate::config::{Config, IoDriver};
use crate::replication::writer_request::WriterRequest;
use crate::session::SessionEnv;

pub use signal::Signal;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The runtime for the requested io driver could not be built.
    #[error("cannot start the {driver} runtime: {source}")]
    Runtime { driver: &'static str, source: std::io::Error },
    /// The client port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    /// A runtime thread could not be spawned.
    #[error("cannot spawn runtime thread: {0}")]
    Thread(std::io::Error),
    /// A runtime thread died.
    #[error("runtime thread {0} failed")]
    ThreadFailed(usize),
    /// A `*.tls` table cannot be used (a missing or unreadable file, a key that does not
    /// match its certificate).
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The peer's Redis address (`[[peers]] redis`) does not resolve.
    #[error("cannot resolve the peer's Redis address {addr}: {reason}")]
    PeerAddress { addr: String, reason: String },
}

/// A message between cores.
pub(crate) enum CoreMsg {
    /// A request for this core's lane (a write for a slot this core sequences).
    Request { from: usize, client: u64, seq: u64, db: u32, proto: u8, frame: Bytes },
    /// Mirror mode: a request for the pair's writer path (core 0), as the client's core
    /// parsed it.
    Writer { from: usize, client: u64, seq: u64, db: u32, proto: u8, work: WriterRequest },
    /// The reply to a request forwarded by this core.
    Reply { client: u64, seq: u64, reply: Bytes },
    /// CLIENT KILL from a client of another core.
    Kill { client: u64 },
    /// Pair mode: a client of another core disconnected (for the writer's WATCH/pop state).
    ClientGone { client: u64 },
    /// Stop accepting, finish in-flight commands.
    Shutdown,
    /// SIGHUP: the client settings each core keeps (AUTH password, refused commands).
    Reload { password: String, refuse_commands: Vec<String> },
}

/// The TLS of each listening and connecting link, built at start (None: plaintext). The
/// Redis links' TLS is in [`upstream::Upstream`].
#[derive(Default)]
pub(crate) struct TlsLinks {
    /// `[client.tls]`, on `[node] listen`.
    pub client: Option<Arc<crate::tls::ServerTls>>,
    /// `[node.admin_tls]`.
    pub admin: Option<Arc<crate::tls::ServerTls>>,
    /// `[replication.tls]`: accepting the peer's link, and opening ours (the certificate
    /// checked against the host of `[[peers]] address`).
    pub peer_accept: Option<Arc<crate::tls::ServerTls>>,
    pub peer_connect: Option<Arc<crate::tls::ClientTls>>,
}

impl TlsLinks {
    fn build(cfg: &Config) -> Result<TlsLinks, crate::tls::TlsError> {
        use crate::tls;
        Ok(TlsLinks {
            client: cfg.client.tls.as_ref().map(|t| tls::server("client.tls", t, false)).transpose()?.map(Arc::new),
            admin: cfg
                .node
                .admin_tls
                .as_ref()
                .map(|t| tls::server("node.admin_tls", t, false))
                .transpose()?
                .map(Arc::new),
            peer_accept: cfg
                .replication
                .tls
                .as_ref()
                .map(|t| tls::server("replication.tls", t, true))
                .transpose()?
                .map(Arc::new),
            peer_connect: cfg
                .replication
                .tls
                .as_ref()
                .map(|t| tls::client("replication.tls", t))
                .transpose()?
                .map(Arc::new),
        })
    }
}

/// Build every TLS configuration `cfg` names, as the server would at start (`--check`):
/// missing or unreadable files, keys that do not match, unusable CAs are errors.
pub fn check_tls(cfg: &Config) -> Result<(), crate::tls::TlsError> {
    TlsLinks::build(cfg)?;
    if let Some(t) = &cfg.redis.tls {
        crate::tls::client("redis.tls", t)?;
    }
    Ok(())
}

/// State shared by all cores (read-mostly, atomics only).
pub(crate) struct Shared {
    pub cfg: Config,
    /// How to reach the Redis (settings and TLS).
    pub upstream: upstream::Upstream,
    pub tls: TlsLinks,
    pub clients: AtomicUsize,
    /// Client TLS handshakes in progress (they count against `max_clients`).
    pub tls_pending: AtomicUsize,
    pub next_client_id: AtomicU64,
    pub inboxes: Vec<async_channel::Sender<Vec<CoreMsg>>>,
    pub shutting_down: AtomicBool,
    pub driver_name: std::sync::OnceLock<&'static str>,
    pub upstream_ids: crate::session::UpstreamIds,
    /// Every client of every core, as CLIENT LIST shows it. Locked on connect, disconnect,
    /// a change of name/db/mode, and CLIENT LIST/KILL: never per ordinary command.
    pub registry: std::sync::Mutex<HashMap<u64, crate::session::ClientInfo>>,
    /// Pair mode: whether reads may use the local Redis (set by core 0's replication shell).
    pub local_in_sync: Arc<AtomicBool>,
    /// The replication status text (RESPLICA STATUS), refreshed by core 0.
    pub status: std::sync::Mutex<String>,
    /// Native mode: the route the control plane publishes.
    pub native: Option<Arc<crate::route::NativeRoute>>,
    /// Native mode: the peer's Redis.
    pub peer_redis: Option<SocketAddr>,
    /// Each core's counters (index = core), summed by `/metrics`.
    pub metrics: Vec<Arc<crate::metrics::CoreMetrics>>,
    /// SIGTERM received: `/readyz` answers 503 while the listeners still accept (drain).
    pub draining: AtomicBool,
    /// `[client]` limits that SIGHUP may change (the rest of `cfg` is fixed at start).
    pub max_clients: AtomicUsize,
    pub output_buffer_limit: AtomicUsize,
    pub pubsub_output_buffer_limit: AtomicUsize,
}

impl Shared {
    fn set_limits(&self, c: &crate::config::ClientConfig) {
        self.max_clients.store(c.max_clients, Ordering::Relaxed);
        self.output_buffer_limit.store(c.output_buffer_limit.0 as usize, Ordering::Relaxed);
        self.pubsub_output_buffer_limit.store(c.pubsub_output_buffer_limit.0 as usize, Ordering::Relaxed);
    }
}

/// One core's state, owned by its runtime thread.
pub(crate) struct Core {
    pub idx: usize,
    pub shared: Arc<Shared>,
    pub env: RefCell<SessionEnv>,
    /// Shared upstream connections: index 0 speaks RESP2, index 1 RESP3.
    pub lanes: [Rc<lane::Lane>; 2],
    /// Native mode: shared connections to the peer's Redis (RESP2, RESP3).
    pub peer_lanes: Option<[Rc<lane::Lane>; 2]>,
    /// Shared connections of Redis ACL users' clients, per (user, protocol, Redis): made on
    /// first use, closed after [`USER_LANE_IDLE`] without a request.
    pub user_lanes: RefCell<HashMap<(crate::session::AclUser, u8, bool), Rc<lane::Lane>>>,
    /// Native mode with `write_ack = "all"`: the `WAIT 1 <ack_timeout_ms>` frame.
    pub native_wait: Option<Bytes>,
    pub clients: RefCell<HashMap<u64, Weak<client::Client>>>,
    pub shutdown: Signal,
    /// Connected, authenticated RESP2 connections in database 0, ready to become a client's
    /// dedicated connection without a connect round trip (so a client's first BLPOP reaches
    /// Redis before commands other clients send after it).
    pub warm: RefCell<Vec<client::WarmConn>>,
    pub warm_refill: Signal,
    /// Messages for other cores, one batch per destination, sent once per event-loop turn
    /// by `flush_outbox` (a cross-thread wake-up per batch, not per command).
    pub outbox: RefCell<Vec<Vec<CoreMsg>>>,
    pub outbox_ready: Signal,
    /// The local Redis's run_id as this core's lane last saw it.
    pub redis_run_id: RefCell<String>,
    /// Core 0 of a node with peers: the replication shell.
    pub repl: RefCell<Option<Rc<replica::Repl>>>,
    /// Native mode's control shell (core 0 only; the admin port's `RESPLICA TAKEOVER`).
    pub native_shell: RefCell<Option<Rc<native::Shell>>>,
    /// This core's counters (only this core writes them).
    pub metrics: Arc<crate::metrics::CoreMetrics>,
}

/// How long a Redis ACL user's shared connection stays open without a request.
pub const USER_LANE_IDLE: Duration = Duration::from_secs(60);

impl Core {
    pub fn lane(&self, proto: u8) -> &Rc<lane::Lane> {
        &self.lanes[if proto >= 3 { 1 } else { 0 }]
    }

    /// A user's lane whose credentials Redis refuses: forget it, and disconnect this core's
    /// clients authenticated as that user with those credentials.
    pub fn drop_user_lane(&self, lane: &lane::Lane) {
        let Some(user) = lane.user() else { return };
        self.user_lanes.borrow_mut().retain(|(u, _, _), l| !(u == user && std::ptr::eq(Rc::as_ptr(l), lane)));
        let clients: Vec<Rc<client::Client>> = self.clients.borrow().values().filter_map(Weak::upgrade).collect();
        for c in clients {
            if c.is_user(user) {
                c.kill();
            }
        }
        warn!(core = self.idx, user = %String::from_utf8_lossy(&user.name), "Redis refused a user's credentials: its clients here were disconnected");
    }

    /// The shared connection of Redis ACL user `user` in protocol `proto` to the local Redis
    /// (`peer`: the peer's, native mode), made on first use.
    pub fn user_lane(self: &Rc<Self>, user: &crate::session::AclUser, proto: u8, peer: bool) -> Rc<lane::Lane> {
        let proto = if proto >= 3 { 3 } else { 2 };
        let key = (user.clone(), proto, peer);
        if let Some(l) = self.user_lanes.borrow().get(&key) {
            return l.clone();
        }
        let (addr, side) = match (peer, self.shared.peer_redis) {
            (true, Some(p)) => (p, crate::replication::native::Side::Peer),
            _ => (self.shared.cfg.redis.address, crate::replication::native::Side::Local),
        };
        let native = self.shared.native.as_ref().map(|route| lane::LaneNative {
            route: route.clone(),
            side,
            wait: self.native_wait.clone(),
        });
        let l = lane::Lane::with_user(
            Rc::downgrade(self),
            proto,
            addr,
            native,
            Some(user.clone()),
            self.shared.cfg.redis.pipeline_batches,
        );
        monoio::spawn(lane::run(l.clone()));
        if self.user_lanes.borrow().is_empty() {
            monoio::spawn(close_idle_user_lanes(self.clone()));
        }
        self.user_lanes.borrow_mut().insert(key, l.clone());
        l
    }

    /// Native mode: the shared connection to the peer's Redis (the local one otherwise).
    pub fn peer_lane(&self, proto: u8) -> &Rc<lane::Lane> {
        match &self.peer_lanes {
            Some(l) => &l[if proto >= 3 { 1 } else { 0 }],
            None => self.lane(proto),
        }
    }

    /// The Redis that dedicated connections (transactions, blocking commands, pub/sub) use:
    /// the primary's in native mode, else the local one.
    pub fn dedicated_target(&self) -> SocketAddr {
        match (&self.shared.native, self.shared.peer_redis) {
            (Some(n), Some(peer)) if n.writes() == crate::route::WriteTarget::Peer => peer,
            _ => self.shared.cfg.redis.address,
        }
    }

    /// Queue a message for core `dest`; it leaves with the rest of this turn's batch.
    pub fn send(&self, dest: usize, msg: CoreMsg) {
        if let Some(q) = self.outbox.borrow_mut().get_mut(dest) {
            q.push(msg);
        }
        self.outbox_ready.notify();
    }
}

/// Handle to stop a running server from another thread (tests, signal handler).
#[derive(Clone)]
pub struct StopHandle {
    shared: Arc<Shared>,
}

impl StopHandle {
    /// Begin a drain (SIGTERM): `/readyz` turns 503 so the load balancer stops sending new
    /// clients; everything else keeps serving until `stop`.
    pub fn drain(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
    }

    /// Apply the `[client]` settings that can change while running (SIGHUP): the password
    /// (new AUTHs; authenticated clients stay), `max_clients`, the output buffer limits and
    /// the refused commands. Every core takes them on its next turn.
    pub fn reload_client(&self, c: &crate::config::ClientConfig) {
        self.shared.set_limits(c);
        for tx in &self.shared.inboxes {
            let _ = tx.try_send(vec![CoreMsg::Reload {
                password: c.password.clone(),
                refuse_commands: c.refuse_commands.clone(),
            }]);
        }
    }

    /// Begin a graceful stop: stop accepting, finish in-flight commands.
    pub fn stop(&self) {
        if !self.shared.shutting_down.swap(true, Ordering::SeqCst) {
            for tx in &self.shared.inboxes {
                let _ = tx.try_send(vec![CoreMsg::Shutdown]);
            }
        }
    }
}

/// A started proxy: its threads and a stop handle.
pub struct Server {
    threads: Vec<std::thread::JoinHandle<Result<(), StartError>>>,
    stop: StopHandle,
}

impl Server {
    /// Start one runtime thread per configured core. Returns once every thread listens.
    pub fn start(cfg: Config) -> Result<Server, StartError> {
        let n = cfg.thread_count();
        let peer_redis = if cfg.native() {
            let addr = &cfg.peers[0].redis;
            let resolved = std::net::ToSocketAddrs::to_socket_addrs(addr.as_str())
                .map_err(|e| StartError::PeerAddress { addr: addr.clone(), reason: e.to_string() })?
                .next()
                .ok_or_else(|| StartError::PeerAddress { addr: addr.clone(), reason: "no address".into() })?;
            Some(resolved)
        } else {
            None
        };
        let native = cfg.native().then(|| Arc::new(crate::route::NativeRoute::default()));
        let tls = TlsLinks::build(&cfg)?;
        let upstream = upstream::Upstream {
            cfg: cfg.redis.clone(),
            tls: cfg.redis.tls.as_ref().map(|t| crate::tls::client("redis.tls", t)).transpose()?.map(Arc::new),
            names: cfg
                .peers
                .iter()
                .filter_map(|p| {
                    let addr = std::net::ToSocketAddrs::to_socket_addrs(p.redis.as_str()).ok()?.next()?;
                    Some((addr, crate::tls::host_of(&p.redis).to_string()))
                })
                .collect(),
        };
        let mut txs = Vec::with_capacity(n);
        let mut rxs = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = async_channel::unbounded();
            txs.push(tx);
            rxs.push(rx);
        }
        let shared = Arc::new(Shared {
            cfg,
            upstream,
            tls,
            clients: AtomicUsize::new(0),
            tls_pending: AtomicUsize::new(0),
            next_client_id: AtomicU64::new(1),
            inboxes: txs,
            shutting_down: AtomicBool::new(false),
            driver_name: std::sync::OnceLock::new(),
            upstream_ids: Default::default(),
            registry: Default::default(),
            local_in_sync: Arc::new(AtomicBool::new(false)),
            status: std::sync::Mutex::new(String::new()),
            native,
            peer_redis,
            metrics: (0..n).map(|_| Arc::new(crate::metrics::CoreMetrics::default())).collect(),
            draining: AtomicBool::new(false),
            max_clients: AtomicUsize::new(0),
            output_buffer_limit: AtomicUsize::new(0),
            pubsub_output_buffer_limit: AtomicUsize::new(0),
        });
        shared.set_limits(&shared.cfg.client);
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<(), StartError>>(n);
        let mut threads = Vec::with_capacity(n);
        for (idx, rx) in rxs.into_iter().enumerate() {
            let shared = shared.clone();
            let ready = ready_tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("resplica-{idx}"))
                .spawn(move || run_thread(idx, shared, rx, ready))
                .map_err(StartError::Thread)?;
            threads.push(t);
        }
        let stop = StopHandle { shared: shared.clone() };
        for _ in 0..n {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    stop.stop();
                    return Err(e);
                }
                Err(_) => {
                    stop.stop();
                    return Err(StartError::ThreadFailed(0));
                }
            }
        }
        info!(
            listen = %shared.cfg.node.listen,
            redis = %shared.cfg.redis.address,
            threads = n,
            io_driver = shared.driver_name.get().copied().unwrap_or("?"),
            slot_sequencing = shared.cfg.slot_sequencing(),
            "resplica ready"
        );
        Ok(Server { threads, stop })
    }

    /// A handle that stops the server.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Wait for every runtime thread to finish.
    pub fn join(self) -> Result<(), StartError> {
        let mut result = Ok(());
        for (i, t) in self.threads.into_iter().enumerate() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(_) => result = Err(StartError::ThreadFailed(i)),
            }
        }
        result
    }
}

type Rt = monoio::FusionRuntime<
    monoio::time::TimeDriver<monoio::IoUringDriver>,
    monoio::time::TimeDriver<monoio::LegacyDriver>,
>;

/// How much io_uring set-up tuning to ask for; a kernel that rejects a level gets the next.
#[derive(Clone, Copy)]
enum UringTuning {
    /// DEFER_TASKRUN (Linux 6.1+) on top of `Coop`: completions are processed only when the
    /// thread enters the kernel to wait, so the work of a whole turn's completions is done
    /// in one go instead of interrupting the thread as each arrives.
    Deferred,
    /// COOP_TASKRUN (5.19+): completions wait for the thread's next entry into the kernel
    /// instead of interrupting it with an IPI each time; SINGLE_ISSUER (6.0+): only this
    /// thread submits.
    Coop,
    /// Neither (older kernels).
    Plain,
}

fn uring_builder(tuning: UringTuning) -> io_uring::Builder {
    let mut b = io_uring::IoUring::builder();
    match tuning {
        UringTuning::Deferred => {
            b.setup_coop_taskrun().setup_taskrun_flag().setup_single_issuer().setup_defer_taskrun();
        }
        UringTuning::Coop => {
            b.setup_coop_taskrun().setup_taskrun_flag().setup_single_issuer();
        }
        UringTuning::Plain => {}
    }
    b
}

fn build_runtime(driver: IoDriver) -> Result<(Rt, &'static str), StartError> {
    let uring = || {
        let build = |tuning| {
            monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .uring_builder(uring_builder(tuning))
                .enable_timer()
                .build()
                .map(|rt| -> Rt { rt.into() })
        };
        build(UringTuning::Deferred)
            .or_else(|_| build(UringTuning::Coop))
            .or_else(|_| build(UringTuning::Plain))
            .map_err(|source| StartError::Runtime { driver: "io_uring", source })
    };
    let epoll = || {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .map(|rt| -> Rt { rt.into() })
            .map_err(|source| StartError::Runtime { driver: "epoll", source })
    };
    match driver {
        IoDriver::IoUring => uring().map(|rt| (rt, "io_uring")),
        IoDriver::Epoll => epoll().map(|rt| (rt, "epoll")),
        IoDriver::Auto => match uring() {
            Ok(rt) => Ok((rt, "io_uring")),
            Err(e) => {
                warn!("io_uring unavailable ({e}); falling back to epoll");
                epoll().map(|rt| (rt, "epoll"))
            }
        },
    }
}

fn run_thread(
    idx: usize,
    shared: Arc<Shared>,
    inbox: async_channel::Receiver<Vec<CoreMsg>>,
    ready: crossbeam_channel::Sender<Result<(), StartError>>,
) -> Result<(), StartError> {
    let (mut rt, driver) = match build_runtime(shared.cfg.node.io_driver) {
        Ok(r) => r,
        Err(e) => {
            let msg = e.to_string();
            let _ = ready.send(Err(e));
            return Err(StartError::Runtime { driver: "?", source: std::io::Error::other(msg) });
        }
    };
    let _ = shared.driver_name.set(driver);
    if idx == 0 {
        info!(io_driver = driver, "runtime io driver in use");
    }
    rt.block_on(core_main(idx, shared, inbox, ready))
}

async fn core_main(
    idx: usize,
    shared: Arc<Shared>,
    inbox: async_channel::Receiver<Vec<CoreMsg>>,
    ready: crossbeam_channel::Sender<Result<(), StartError>>,
) -> Result<(), StartError> {
    let addr = shared.cfg.node.listen;
    let opts = ListenerOpts::new().reuse_port(true).reuse_addr(true).backlog(1024);
    let listener = match TcpListener::bind_with_config(addr, &opts) {
        Ok(l) => l,
        Err(source) => {
            let msg = source.to_string();
            let _ = ready.send(Err(StartError::Listen { addr, source }));
            return Err(StartError::Listen { addr, source: std::io::Error::other(msg) });
        }
    };
    let cfg = &shared.cfg;
    // `[node] plaintext_listen`: a plaintext client port beside the TLS one.
    let plaintext = match cfg.node.plaintext_listen.map(|a| (a, TcpListener::bind_with_config(a, &opts))) {
        None => None,
        Some((_, Ok(l))) => Some(l),
        Some((addr, Err(source))) => {
            let msg = source.to_string();
            let _ = ready.send(Err(StartError::Listen { addr, source }));
            return Err(StartError::Listen { addr, source: std::io::Error::other(msg) });
        }
    };
    let env = SessionEnv {
        password: cfg.client.password.clone(),
        refused: crate::session::Refused::new(&cfg.client.refuse_commands),
        threads: cfg.thread_count(),
        slot_sequencing: cfg.slot_sequencing(),
        redis_version: "7.0.0".into(),
        databases: 16,
        upstream_ids: shared.upstream_ids.clone(),
        pair: cfg.mirror(),
        local_in_sync: shared.local_in_sync.clone(),
        native: shared.native.clone(),
        write_ack_local: cfg.replication.write_ack == crate::config::WriteAck::Local,
    };
    let wait = (cfg.replication.write_ack == crate::config::WriteAck::All).then(|| {
        crate::resp::Request::from_args(&[
            b"WAIT".as_slice(),
            b"1",
            cfg.replication.ack_timeout_ms.to_string().as_bytes(),
        ])
        .frame
    });
    let lane_native =
        |side| shared.native.as_ref().map(|route| lane::LaneNative { route: route.clone(), side, wait: wait.clone() });
    use crate::replication::native::Side;
    let batches = cfg.redis.pipeline_batches;
    let core = Rc::new_cyclic(|weak: &Weak<Core>| Core {
        idx,
        shared: shared.clone(),
        env: RefCell::new(env),
        lanes: [
            lane::Lane::new(weak.clone(), 2, cfg.redis.address, lane_native(Side::Local), batches),
            lane::Lane::new(weak.clone(), 3, cfg.redis.address, lane_native(Side::Local), batches),
        ],
        native_wait: if shared.native.is_some() { wait.clone() } else { None },
        user_lanes: RefCell::new(HashMap::new()),
        peer_lanes: shared.peer_redis.map(|peer| {
            [
                lane::Lane::new(weak.clone(), 2, peer, lane_native(Side::Peer), batches),
                lane::Lane::new(weak.clone(), 3, peer, lane_native(Side::Peer), batches),
            ]
        }),
        clients: RefCell::new(HashMap::new()),
        shutdown: Signal::default(),
        warm: RefCell::new(Vec::new()),
        warm_refill: Signal::default(),
        outbox: RefCell::new((0..shared.inboxes.len()).map(|_| Vec::new()).collect()),
        outbox_ready: Signal::default(),
        redis_run_id: RefCell::new(String::new()),
        repl: RefCell::new(None),
        native_shell: RefCell::new(None),
        metrics: shared.metrics[idx].clone(),
    });
    if idx == 0 && cfg.mirror() {
        match replica::Repl::start(&core) {
            Ok(r) => *core.repl.borrow_mut() = Some(r),
            Err(e) => {
                let msg = e.to_string();
                let _ = ready.send(Err(StartError::Listen { addr: cfg.node.peer_listen, source: e }));
                return Err(StartError::Listen { addr: cfg.node.peer_listen, source: std::io::Error::other(msg) });
            }
        }
    }
    if idx == 0 && cfg.native() {
        if let Err(e) = native::start(&core) {
            let msg = e.to_string();
            let _ = ready.send(Err(StartError::Listen { addr: cfg.node.peer_listen, source: e }));
            return Err(StartError::Listen { addr: cfg.node.peer_listen, source: std::io::Error::other(msg) });
        }
    }
    if idx == 0 {
        let admin = cfg.node.admin_listen;
        match TcpListener::bind_with_config(admin, &ListenerOpts::new().reuse_addr(true)) {
            Ok(l) => {
                monoio::spawn(admin::serve(core.clone(), l));
            }
            Err(e) => warn!(addr = %admin, "cannot serve the admin port (status, /metrics, /livez, /readyz): {e}"),
        }
    }
    for l in core.lanes.iter().chain(core.peer_lanes.iter().flatten()) {
        monoio::spawn(lane::run(l.clone()));
    }
    monoio::spawn(inbox_loop(core.clone(), inbox));
    monoio::spawn(flush_outbox(core.clone()));
    monoio::spawn(client::keep_warm(core.clone()));
    let _ = ready.send(Ok(()));

    loop {
        let (accepted, tls) = monoio::select! {
            a = listener.accept() => (a, shared.tls.client.clone()),
            a = accept_on(plaintext.as_ref()) => (a, None),
            _ = core.shutdown.wait() => break,
        };
        match accepted {
            Ok((stream, peer)) => accept_client(&core, stream, peer, tls),
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                error!("accept failed: {e}");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    drop(plaintext);
    // Graceful stop: every client finishes what is in flight, then closes.
    let clients: Vec<_> = core.clients.borrow().values().filter_map(Weak::upgrade).collect();
    for c in &clients {
        c.begin_close();
    }
    drop(clients);
    let deadline = std::time::Instant::now() + Duration::from_millis(cfg.redis.request_timeout_ms + 1000);
    while !core.clients.borrow().is_empty() && std::time::Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    for l in core.lanes.iter().chain(core.peer_lanes.iter().flatten()) {
        l.stop();
    }
    for (_, l) in core.user_lanes.borrow_mut().drain() {
        l.stop();
    }
    Ok(())
}

/// Accept on `listener`, or never when there is none.
async fn accept_on(listener: Option<&TcpListener>) -> std::io::Result<(monoio::net::TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// A connection on a client port: plaintext goes straight to the client's tasks; TLS first
/// completes its handshake on a task of its own, so the accept loop never waits for it.
fn accept_client(
    core: &Rc<Core>,
    stream: monoio::net::TcpStream,
    peer: SocketAddr,
    tls: Option<Arc<crate::tls::ServerTls>>,
) {
    let local = stream.local_addr().map(|a| a.to_string()).unwrap_or_default();
    match tls {
        None => {
            let _ = stream.set_nodelay(true);
            client::accept(core, conn::Conn::Plain(stream), peer, local)
        }
        Some(tls) => {
            // Handshakes in progress count against max_clients: each holds a descriptor for
            // up to TLS_ACCEPT_TIMEOUT before it is a client.
            let shared = &core.shared;
            let pending = shared.tls_pending.fetch_add(1, Ordering::AcqRel) + 1;
            if shared.clients.load(Ordering::Acquire) + pending > shared.max_clients.load(Ordering::Relaxed) {
                shared.tls_pending.fetch_sub(1, Ordering::AcqRel);
                core.metrics.clients_rejected.inc();
                return;
            }
            let core = core.clone();
            monoio::spawn(async move {
                let done = conn::Conn::accept_tls(stream, &tls, conn::TLS_ACCEPT_TIMEOUT).await;
                core.shared.tls_pending.fetch_sub(1, Ordering::AcqRel);
                match done {
                    // (A stop that began meanwhile already told every client to close.)
                    Ok(_) if core.shared.shutting_down.load(Ordering::Acquire) => {}
                    Ok(c) => client::accept(&core, c, peer, local),
                    Err(e) => {
                        core.metrics.tls_handshake_failures.inc();
                        tracing::debug!(%peer, "client TLS: {e}");
                    }
                }
            });
        }
    }
}

async fn inbox_loop(core: Rc<Core>, inbox: async_channel::Receiver<Vec<CoreMsg>>) {
    while let Ok(batch) = inbox.recv().await {
        for msg in batch {
            match msg {
                CoreMsg::Writer { from, client, seq, db, proto, work } => {
                    let sink = sink::Sink::Remote { core: from, client, seq };
                    let repl = core.repl.borrow().clone();
                    match repl {
                        Some(r) => r.submit_client(sink, client, db, proto, work),
                        None => core.send(
                            from,
                            CoreMsg::Reply {
                                client,
                                seq,
                                reply: crate::resp::error("ERR resplica: no writer path on this core"),
                            },
                        ),
                    }
                }
                CoreMsg::Request { from, client, seq, db, proto, frame } => {
                    let sink = sink::Sink::Remote { core: from, client, seq };
                    if let Err(reply) = core.lane(proto).enqueue(db, frame, sink, false) {
                        core.send(from, CoreMsg::Reply { client, seq, reply });
                    }
                }
                CoreMsg::Reply { client, seq, reply } => {
                    let c = core.clients.borrow().get(&client).and_then(Weak::upgrade);
                    if let Some(c) = c {
                        c.fill(seq, reply);
                    }
                }
                CoreMsg::Kill { client } => {
                    let c = core.clients.borrow().get(&client).and_then(Weak::upgrade);
                    if let Some(c) = c {
                        c.kill();
                    }
                }
                CoreMsg::ClientGone { client } => {
                    let repl = core.repl.borrow().clone();
                    if let Some(r) = repl {
                        r.client_gone(client);
                    }
                }
                CoreMsg::Shutdown => core.shutdown.notify(),
                CoreMsg::Reload { password, refuse_commands } => {
                    let mut env = core.env.borrow_mut();
                    env.password = password;
                    env.refused = crate::session::Refused::new(&refuse_commands);
                }
            }
        }
    }
}

/// Send each destination's batch. Woken by the first message of a turn, it runs after the
/// tasks already scheduled, so everything they queue leaves together.
async fn flush_outbox(core: Rc<Core>) {
    loop {
        core.outbox_ready.wait().await;
        let batches: Vec<(usize, Vec<CoreMsg>)> = core
            .outbox
            .borrow_mut()
            .iter_mut()
            .enumerate()
            .filter(|(_, q)| !q.is_empty())
            .map(|(dest, q)| (dest, std::mem::take(q)))
            .collect();
        for (dest, batch) in batches {
            if let Err(failed) = core.shared.inboxes[dest].try_send(batch) {
                // The destination is gone (shutting down): answer our own clients' requests.
                for msg in failed.into_inner() {
                    if let CoreMsg::Request { client, seq, .. } | CoreMsg::Writer { client, seq, .. } = msg {
                        let c = core.clients.borrow().get(&client).and_then(Weak::upgrade);
                        if let Some(c) = c {
                            c.fill(seq, crate::resp::error("ERR resplica: sequencer core unavailable (shutting down)"));
                        }
                    }
                }
            }
        }
    }
}

/// Close the ACL users' shared connections idle for [`USER_LANE_IDLE`]; ends when none is
/// left (the next one made starts it again).
async fn close_idle_user_lanes(core: Rc<Core>) {
    loop {
        monoio::time::sleep(USER_LANE_IDLE / 4).await;
        core.user_lanes.borrow_mut().retain(|_, l| {
            let keep = !l.idle_for(USER_LANE_IDLE);
            if !keep {
                l.stop();
            }
            keep
        });
        if core.user_lanes.borrow().is_empty() {
            return;
        }
    }
}

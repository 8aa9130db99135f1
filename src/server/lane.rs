//! A lane: one core's shared, pipelined connection to a Redis (the local one; in native mode
//! also the peer's; per Redis ACL user too, made on first use, see `Core::user_lane`;
//! connecting itself is `upstream`'s). Requests from every
//! client of the core (and writes hopping in from other cores) are appended to one output
//! buffer and written together: at once when the lane is idle, else when the batch in flight
//! is answered (`[redis] pipeline_batches`); replies come back in order and are matched to
//! their senders first-in first-out.
//!
//! In a native-mode pair with `write_ack = "all"`, every batch that carries a write ends with
//! `WAIT 1 <ack_timeout_ms>` on the same connection (one wait per batch, DESIGN.md N3): the
//! batch's replies are held until the WAIT answers, and writes queued meanwhile leave together
//! with the next WAIT once it does (Redis blocks the connection in WAIT anyway).
//!
//! The lane owns reconnecting (with capped exponential backoff) and the request timeout: when
//! Redis is down or stalls, every waiting sender gets a clear `-ERR` instead of a hang.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use monoio::io::AsyncWriteRentExt;
use tracing::{info, warn};

use super::conn::{ConnReader, ConnWriter};
use super::io::read_more;
use super::sink::{deliver_to, Sink};
use super::stall::{tick_for, StallClock};
use super::upstream::{connect_redis_as, connect_upstream, roundtrip, run_of};
use super::{Core, Signal};
use crate::replication::native::Side;
use crate::resp::{self, ReplySkimmer};
use crate::route::NativeRoute;
use crate::session::AclUser;

/// A batch this large is written even while earlier ones wait for replies.
const BATCH_MAX_COMMANDS: usize = 1024;

/// A write's database and frame (its keys are recorded if its WAIT is not confirmed).
pub(crate) type Write = (u32, Bytes);

/// Native, `write_ack = "all"`: what a client gets for a write whose `WAIT` came back 0. On
/// the local Redis, while the route is what it was when the write was sent (`generation`):
/// the reply, its keys recorded for a partition merge (N6; `None`: keys unknown, every key);
/// on the peer's Redis, or after the route changed (a merge that needed the key may have
/// run): an error, since the write may be lost.
pub(crate) fn unconfirmed(
    route: &NativeRoute,
    side: Side,
    generation: u64,
    write: Option<Write>,
    reply: Bytes,
) -> Bytes {
    if resp::is_error(&reply) {
        return reply;
    }
    route.unconfirmed_writes.fetch_add(1, Ordering::Relaxed);
    let unchanged = route.generation() == generation && route.writes() == crate::route::WriteTarget::Local;
    if side == Side::Local && unchanged {
        match write {
            Some((db, frame)) => route.record_frame(db, &frame),
            None => route.record(0, None::<std::iter::Empty<&[u8]>>),
        }
        reply
    } else {
        resp::error(
            "ERR resplica: the write reached the primary but its replica did not confirm it in time; it may be lost if the primary fails",
        )
    }
}

/// A request waiting for its reply.
struct Pending {
    sink: Sink,
    mark: Mark,
    /// Native, `write_ack = "all"`: the write, when it is one.
    write: Option<Write>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mark {
    /// Delivered when its reply arrives.
    Plain,
    /// Part of a batch that ends with WAIT: held until the WAIT answers.
    Held,
    /// The WAIT itself, with the route's generation when it was sent.
    Wait(u64),
    /// A write sent without WAIT (the replica is not linked): counted as acknowledged on
    /// the primary alone when Redis accepts it.
    Alone,
}

/// Native mode: what the lane needs to know about the pair.
pub(crate) struct LaneNative {
    pub route: Arc<NativeRoute>,
    /// Which Redis this lane talks to.
    pub side: Side,
    /// `WAIT 1 <ack_timeout_ms>`, when `write_ack = "all"`.
    pub wait: Option<Bytes>,
}

struct LaneState {
    /// No connection was tried yet: requests queue for the first one.
    first_connect: bool,
    connected: bool,
    stopping: bool,
    /// Why the lane is not connected (for the error clients get).
    down_reason: String,
    /// Database the connection is in once everything queued has run.
    db: u32,
    /// Frames waiting to be written, coalesced (large ones shared, not copied).
    out: resp::WriteBatch,
    /// Senders waiting for replies, oldest first.
    sinks: VecDeque<Pending>,
    /// Requests queued since the last write to Redis, and how many of them are writes.
    unflushed: usize,
    unflushed_writes: usize,
    /// Replies waiting for their batch's WAIT: (sink, reply, write).
    held: Vec<(Sink, Bytes, Option<Write>)>,
    /// WAITs sent and not answered on this connection.
    waits_in_flight: usize,
    /// Replies received on this connection (the stall detector watches it move).
    replies_seen: u64,
    /// Batches written and not fully answered: the `replies_seen` count at which each is.
    batch_ends: VecDeque<u64>,
    /// Why the current connection must be abandoned (set by the timeout check).
    broken: Option<String>,
}

/// One shared upstream connection of a core.
pub(crate) struct Lane {
    core: Weak<Core>,
    proto: u8,
    /// The Redis this lane connects to.
    addr: SocketAddr,
    native: Option<LaneNative>,
    /// Native mode: the run of the Redis the current connection reaches (`run_id_hash`).
    run_id: std::cell::Cell<u64>,
    /// A Redis ACL user's lane: its connections authenticate as that user.
    user: Option<AclUser>,
    /// Requests queued so far, and that count with the time an idle check first saw it
    /// (user lanes close when idle). A count, not a clock read per request: the hot path
    /// reads no clock for it.
    queued: std::cell::Cell<u64>,
    idle_seen: std::cell::Cell<(u64, Instant)>,
    st: RefCell<LaneState>,
    /// `[redis] pipeline_batches`.
    max_batches: usize,
    wake_writer: Signal,
    wake_conn: Signal,
}

impl Lane {
    /// `max_batches`: `[redis] pipeline_batches`.
    pub fn new(
        core: Weak<Core>,
        proto: u8,
        addr: SocketAddr,
        native: Option<LaneNative>,
        max_batches: usize,
    ) -> Rc<Lane> {
        Self::with_user(core, proto, addr, native, None, max_batches)
    }

    /// A lane whose connections authenticate as Redis ACL user `user` (`None`: the `[redis]`
    /// credentials). A user's lane is made on first use: requests queued before its first
    /// connection wait for it (and fail if it cannot be made).
    pub fn with_user(
        core: Weak<Core>,
        proto: u8,
        addr: SocketAddr,
        native: Option<LaneNative>,
        user: Option<AclUser>,
        max_batches: usize,
    ) -> Rc<Lane> {
        let first_connect = user.is_some();
        Rc::new(Lane {
            max_batches,
            core,
            proto,
            addr,
            native,
            run_id: std::cell::Cell::new(0),
            user,
            queued: std::cell::Cell::new(0),
            idle_seen: std::cell::Cell::new((0, Instant::now())),
            st: RefCell::new(LaneState {
                first_connect,
                connected: false,
                stopping: false,
                down_reason: "not connected yet".into(),
                db: 0,
                out: resp::WriteBatch::default(),
                sinks: VecDeque::new(),
                unflushed: 0,
                unflushed_writes: 0,
                held: Vec::new(),
                waits_in_flight: 0,
                replies_seen: 0,
                batch_ends: VecDeque::new(),
                broken: None,
            }),
            wake_writer: Signal::default(),
            wake_conn: Signal::default(),
        })
    }

    /// Queue a request (`write`: it may change data); the error reply to give the sender if
    /// Redis is unreachable.
    pub fn enqueue(&self, db: u32, frame: Bytes, sink: Sink, write: bool) -> Result<(), Bytes> {
        let mut st = self.st.borrow_mut();
        self.queued.set(self.queued.get() + 1);
        if !st.connected && !st.first_connect {
            return Err(resp::error(&format!(
                "ERR resplica: Redis at {} is unavailable ({})",
                self.addr, st.down_reason
            )));
        }
        if db != st.db {
            st.push_frame(&crate::command::frames::select(db));
            st.sinks.push_back(Pending { sink: Sink::Discard, mark: Mark::Plain, write: None });
            st.unflushed += 1;
            st.db = db;
        }
        st.push_frame(&frame);
        let acked = write && self.native.as_ref().is_some_and(|n| n.wait.is_some());
        let write = if acked { Some((db, frame)) } else { None };
        st.sinks.push_back(Pending { sink, mark: Mark::Plain, write });
        st.unflushed += 1;
        if acked {
            st.unflushed_writes += 1;
        }
        drop(st);
        self.wake_writer.notify();
        Ok(())
    }

    /// Adaptive batching: while `[redis] pipeline_batches` batches wait for their replies,
    /// requests collect for the next one (an idle lane writes at once; a busy one writes what
    /// arrived during a round trip in one go), up to [`BATCH_MAX_COMMANDS`].
    fn coalescing(&self) -> bool {
        let max = self.max_batches;
        if max == 0 {
            return false;
        }
        let st = self.st.borrow();
        st.unflushed > 0 && st.unflushed < BATCH_MAX_COMMANDS && st.batch_ends.len() >= max
    }

    /// Whether the connection to Redis is up.
    pub fn is_connected(&self) -> bool {
        self.st.borrow().connected
    }

    /// Native mode: whether writes may use this connection now: it is up and reaches the run
    /// of that Redis the control plane approved for writes.
    pub fn writable(&self) -> bool {
        match &self.native {
            Some(n) => self.is_connected() && n.route.approved(n.side, self.run_id.get()),
            None => self.is_connected(),
        }
    }

    /// The Redis ACL user this lane authenticates as.
    pub fn user(&self) -> Option<&AclUser> {
        self.user.as_ref()
    }

    /// Nothing was queued for `d` and nothing waits for a reply, as far as checks every
    /// fraction of `d` can tell: the time counts from the first check that saw no new
    /// request.
    pub fn idle_for(&self, d: Duration) -> bool {
        let queued = self.queued.get();
        let (seen, since) = self.idle_seen.get();
        if queued != seen {
            self.idle_seen.set((queued, Instant::now()));
            return false;
        }
        since.elapsed() >= d && self.st.borrow().sinks.is_empty()
    }

    /// Stop reconnecting (graceful shutdown).
    pub fn stop(&self) {
        self.st.borrow_mut().stopping = true;
        self.wake_conn.notify();
    }

    fn deliver(&self, sink: Sink, reply: Bytes) {
        if let Some(c) = self.core.upgrade() {
            deliver_to(&c, sink, reply);
        }
    }

    fn fail_all(&self, reason: &str) {
        let msg = resp::error(&format!("ERR resplica: {reason}"));
        let held = std::mem::take(&mut self.st.borrow_mut().held);
        for (sink, _, _) in held {
            self.deliver(sink, msg.clone());
        }
        loop {
            let next = self.st.borrow_mut().sinks.pop_front();
            match next {
                Some(p) => self.deliver(p.sink, msg.clone()),
                None => break,
            }
        }
        let mut st = self.st.borrow_mut();
        st.unflushed = 0;
        st.unflushed_writes = 0;
        st.waits_in_flight = 0;
    }

    /// A reply arrived for the oldest pending request.
    fn on_reply(&self, p: Pending, reply: Bytes) {
        match p.mark {
            Mark::Plain => self.deliver(p.sink, reply),
            Mark::Alone => {
                if let Some(n) = self.native.as_ref().filter(|_| !resp::is_error(&reply)) {
                    n.route.acks_on_primary_alone.fetch_add(1, Ordering::Relaxed);
                }
                self.deliver(p.sink, reply)
            }
            Mark::Held => self.st.borrow_mut().held.push((p.sink, reply, p.write)),
            Mark::Wait(generation) => {
                let confirmed = resp::integer_reply(&reply).is_some_and(|n| n >= 1);
                let held = {
                    let mut st = self.st.borrow_mut();
                    st.waits_in_flight = st.waits_in_flight.saturating_sub(1);
                    std::mem::take(&mut st.held)
                };
                // What collected behind this WAIT goes now.
                self.wake_writer.notify();
                for (sink, r, write) in held {
                    let reply = match (write, &self.native) {
                        (Some(w), Some(n)) if !confirmed => unconfirmed(&n.route, n.side, generation, Some(w), r),
                        _ => r,
                    };
                    self.deliver(sink, reply);
                }
            }
        }
    }
}

impl LaneState {
    fn push_frame(&mut self, frame: &Bytes) {
        self.out.push(frame);
    }

    /// Everything queued, as chunks to write; ends a batch that carries writes with `wait`
    /// (when given), holding its replies until the WAIT answers. `wait` is `None` when the
    /// replica is not connected: such writes are acknowledged on the primary alone.
    fn take_out(&mut self, wait: Option<&Bytes>, native: Option<&LaneNative>) -> VecDeque<Bytes> {
        if self.unflushed_writes > 0 {
            match wait {
                Some(w) => {
                    let n = self.unflushed.min(self.sinks.len());
                    let len = self.sinks.len();
                    for p in self.sinks.range_mut(len - n..) {
                        p.mark = Mark::Held;
                    }
                    self.push_frame(w);
                    self.waits_in_flight += 1;
                    let generation = native.map(|n| n.route.generation()).unwrap_or(0);
                    self.sinks.push_back(Pending { sink: Sink::Discard, mark: Mark::Wait(generation), write: None });
                }
                None => {
                    let n = self.unflushed.min(self.sinks.len());
                    let len = self.sinks.len();
                    for p in self.sinks.range_mut(len - n..) {
                        if p.write.is_some() {
                            p.mark = Mark::Alone;
                        }
                    }
                }
            }
        }
        self.unflushed = 0;
        self.unflushed_writes = 0;
        self.out.take()
    }
}

/// Learn the Redis version and number of databases for HELLO and SELECT. Every core keeps
/// its own `SessionEnv`, so each core's RESP2 lane learns them for its core.
async fn learn_server_facts(core: &Core) {
    let Ok(mut s) = connect_upstream(core, 2, 0).await else { return };
    let cmds = vec![
        vec![b"INFO".to_vec(), b"server".to_vec()],
        vec![b"CONFIG".to_vec(), b"GET".to_vec(), b"databases".to_vec()],
    ];
    let Ok(replies) = roundtrip(&mut s, &cmds, core.shared.cfg.redis.connect_timeout_ms).await else { return };
    let info = String::from_utf8_lossy(&replies[0]);
    let mut env = core.env.borrow_mut();
    if let Some(v) = crate::replication::reply::info_field(&info, "redis_version") {
        env.redis_version = v.to_string();
    }
    if let Some(v) = crate::replication::reply::info_field(&info, "run_id") {
        core.redis_run_id.replace(v.to_string());
    }
    // CONFIG GET reply: *2 $9 databases $N <n>
    let cfg = String::from_utf8_lossy(&replies[1]);
    if let Some(n) = cfg.lines().filter(|l| !l.starts_with(['*', '$'])).nth(1).and_then(|n| n.trim().parse().ok()) {
        env.databases = n;
    }
}

/// The lane's life: connect, serve until the connection breaks or stalls, fail whoever was
/// waiting, back off, reconnect.
impl Lane {
    /// Which Redis this lane reaches, for the metrics.
    fn upstream(&self) -> crate::metrics::Upstream {
        match &self.native {
            Some(n) if n.side == crate::replication::native::Side::Peer => crate::metrics::Upstream::Peer,
            _ => crate::metrics::Upstream::Local,
        }
    }
}

pub(crate) async fn run(lane: Rc<Lane>) {
    let Some(core) = lane.core.upgrade() else { return };
    let up = core.shared.upstream.clone();
    let cfg = &up.cfg;
    let max_backoff = Duration::from_millis(cfg.reconnect_backoff_max_ms.max(10));
    let mut backoff = Duration::from_millis(10);
    let mut was_up = true;
    monoio::spawn(timeout_watch(lane.clone(), Duration::from_millis(cfg.request_timeout_ms)));
    loop {
        if lane.st.borrow().stopping {
            return;
        }
        let upstream = &core.metrics.upstream[lane.upstream() as usize];
        match connect_redis_as(&up, lane.addr, lane.proto, 0, lane.user.as_ref()).await {
            Ok(mut stream) => {
                lane.st.borrow_mut().first_connect = false;
                upstream.connects.inc();
                if lane.proto == 2 && lane.addr == cfg.address && lane.user.is_none() {
                    learn_server_facts(&core).await;
                }
                if lane.native.is_some() {
                    // Which run of that Redis this connection reaches: writes go only to the
                    // run the control plane compared (a Redis restarted empty must not take
                    // writes before that).
                    match run_of(&up, lane.addr, &mut stream).await {
                        Some(run) => lane.run_id.set(run),
                        None => {
                            warn!(
                                core = core.idx,
                                proto = lane.proto,
                                "Redis at {} did not answer INFO; reconnecting",
                                lane.addr
                            );
                            monoio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(max_backoff);
                            continue;
                        }
                    }
                }
                if !was_up {
                    info!(core = core.idx, proto = lane.proto, "connected to Redis at {}", lane.addr);
                }
                was_up = true;
                backoff = Duration::from_millis(10);
                {
                    let mut st = lane.st.borrow_mut();
                    st.connected = true;
                    st.batch_ends.clear();
                    // (Requests queued for a user lane's first connection already account for
                    // the database they select: it starts in 0 as they assumed.)
                    if st.sinks.is_empty() {
                        st.db = 0;
                    }
                    st.broken = None;
                }
                let (rd, wr) = stream.into_split();
                let reason = monoio::select! {
                    r = read_loop(&lane, rd) => r,
                    r = write_loop(&lane, wr) => r,
                    _ = lane.wake_conn.wait() => {
                        let st = lane.st.borrow();
                        st.broken.clone().unwrap_or_else(|| "resplica is shutting down".to_string())
                    },
                };
                if !lane.st.borrow().stopping {
                    upstream.errors.inc();
                }
                {
                    let mut st = lane.st.borrow_mut();
                    st.connected = false;
                    st.down_reason = reason.clone();
                    st.out.clear();
                }
                let closing = lane.st.borrow().stopping;
                if !closing {
                    warn!(core = core.idx, proto = lane.proto, "connection to Redis at {} lost: {reason}", lane.addr);
                }
                if lane.addr == cfg.address && !closing && lane.user.is_none() {
                    // Spare connections are likely dead too (Redis restarted): make new ones.
                    core.warm.borrow_mut().clear();
                    core.warm_refill.notify();
                }
                lane.fail_all(&format!("connection to Redis at {} failed: {reason}", lane.addr));
                continue;
            }
            Err(e) => {
                upstream.errors.inc();
                lane.st.borrow_mut().down_reason = e.clone();
                if lane.user.is_some() && e.starts_with("AUTH rejected") {
                    // The user was deleted, disabled or given another password (Redis closes
                    // its connections then): as Redis would, this core's clients of that user
                    // are disconnected, and the lane goes (a new AUTH makes a new one).
                    lane.st.borrow_mut().first_connect = false;
                    {
                        let mut st = lane.st.borrow_mut();
                        st.out.clear();
                    }
                    lane.fail_all(&format!("Redis refused this user's credentials: {e}"));
                    lane.stop();
                    core.drop_user_lane(&lane);
                    return;
                }
                if std::mem::take(&mut lane.st.borrow_mut().first_connect) {
                    // What queued for the first connection fails with the reason, and is
                    // never sent (the clients were told it failed).
                    {
                        let mut st = lane.st.borrow_mut();
                        st.out.clear();
                        st.db = 0;
                    }
                    lane.fail_all(&format!("Redis at {} is unavailable ({e})", lane.addr));
                }
                if was_up {
                    warn!(core = core.idx, proto = lane.proto, "cannot reach Redis at {}: {e}; retrying", lane.addr);
                    was_up = false;
                }
            }
        }
        monoio::select! {
            _ = monoio::time::sleep(backoff) => {},
            _ = lane.wake_conn.wait() => {},
        }
        backoff = (backoff * 2).min(max_backoff);
    }
}

async fn read_loop(lane: &Lane, mut rd: ConnReader) -> String {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut skim = ReplySkimmer::new();
    loop {
        let hint = skim.bytes_hint(buf.len());
        let (res, b) = read_more(&mut rd, buf, hint).await;
        buf = b;
        match res {
            Ok(0) => return "Redis closed the connection".to_string(),
            Ok(_) => {}
            Err(e) => return format!("read: {e}"),
        }
        loop {
            match skim.next_reply(&mut buf) {
                Ok(Some(reply)) if reply.first() == Some(&b'>') => {
                    // A RESP3 push is not a reply to anything. On a shared connection it can
                    // only be an invalidation redirected here by some client's CLIENT TRACKING
                    // REDIRECT: it belongs to nobody, and must not be taken for a reply.
                    tracing::debug!(
                        core = lane.core.upgrade().map(|c| c.idx),
                        "dropped a push frame on a shared connection"
                    );
                }
                Ok(Some(reply)) => {
                    let next = {
                        let mut st = lane.st.borrow_mut();
                        st.replies_seen += 1;
                        if st.batch_ends.front() == Some(&st.replies_seen) {
                            st.batch_ends.pop_front();
                            if st.unflushed > 0 {
                                // A batch is answered: what collected meanwhile may go.
                                lane.wake_writer.notify();
                            }
                        }
                        st.sinks.pop_front()
                    };
                    match next {
                        Some(p) => lane.on_reply(p, reply),
                        None => return "Redis sent a reply nobody asked for".to_string(),
                    }
                }
                Ok(None) => break,
                Err(e) => return e.to_string(),
            }
        }
    }
}

async fn write_loop(lane: &Lane, mut wr: ConnWriter) -> String {
    loop {
        let wait = lane.native.as_ref().and_then(|n| n.wait.as_ref().filter(|_| n.route.replica_linked()));
        // Redis blocks this connection in WAIT until the replica answers: a batch sent now
        // would only queue behind it. Keep collecting instead, and send everything gathered
        // meanwhile with one WAIT when the last one answers (batches grow with the load; an
        // idle lane sends at once).
        let collect = wait.is_some() && {
            let st = lane.st.borrow();
            st.waits_in_flight > 0 && st.unflushed_writes > 0
        };
        if collect || lane.coalescing() {
            lane.wake_writer.wait().await;
            continue;
        }
        let (chunks, commands) = {
            let mut st = lane.st.borrow_mut();
            let commands = st.unflushed;
            let chunks = st.take_out(wait, lane.native.as_ref());
            if !chunks.is_empty() {
                let end = st.replies_seen + st.sinks.len() as u64;
                if st.batch_ends.back() != Some(&end) {
                    st.batch_ends.push_back(end);
                }
            }
            (chunks, commands)
        };
        if chunks.is_empty() {
            lane.wake_writer.wait().await;
            continue;
        }
        if let Some(core) = lane.core.upgrade() {
            let m = &core.metrics.upstream[lane.upstream() as usize];
            m.batches.inc();
            m.commands.add(commands as u64);
        }
        for chunk in chunks {
            let (res, _) = wr.write_all(chunk).await;
            if let Err(e) = res {
                return format!("write: {e}");
            }
        }
    }
}

/// Fail the connection when requests wait and no reply has come for longer than the request
/// timeout (see `stall`).
async fn timeout_watch(lane: Rc<Lane>, limit: Duration) {
    let tick = tick_for(limit);
    let mut clock = StallClock::default();
    loop {
        monoio::time::sleep(tick).await;
        let mut st = lane.st.borrow_mut();
        if st.stopping {
            return;
        }
        let waiting = st.connected && st.broken.is_none() && !st.sinks.is_empty();
        if clock.stalled(waiting, st.replies_seen, Instant::now(), limit, tick) {
            st.broken = Some(format!("Redis did not answer within {} ms", limit.as_millis()));
            drop(st);
            lane.wake_conn.notify();
        }
    }
}

//! The writer's sequencer (DESIGN.md invariants 1, 3, 4, 6): one ordered stream of writes
//! per replica Redis, a log per stream that is both its send queue and its backlog, acks
//! counted per `write_ack`, effects computed from the source replica's replies, full resync
//! and partition-merge copies placed in stream order, blocking pops served here, WATCH
//! checked here.
//!
//! Sans-IO: the shell feeds requests (`submit`), replies per stream (`on_reply`),
//! connection events (`on_up`, `on_down`) and the time (every call that needs it takes
//! `now_ms`); it takes batches to write (`take_batch`) and replies for clients
//! (`take_replies`). It never touches a socket or a clock.
//!
//! Stream 0 is the local Redis. A stream whose connection dies with writes in flight cannot
//! prove which of them were applied, so it is rebuilt (full resync) rather than replayed.

use std::collections::{HashMap, HashSet, VecDeque};

use bytes::{Bytes, BytesMut};
use smallvec::SmallVec;
use tracing::{info, warn};

use super::effects::{self, FromReply, Shipped};
use super::reply;
use crate::command::{self, facts, F_BLOCKING};
use crate::resp::{self, Request};

pub use super::writer_request::WriterRequest;

/// A write's position in the writer's global order.
pub type Seq = u64;
/// The shell's handle for where a reply goes.
pub type Ticket = u64;

/// What a replica is doing, as the status command shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    /// Applies every write as it is sequenced; serves reads.
    InSync,
    /// Replaying its backlog.
    CatchingUp,
    /// Being rebuilt from an in-sync replica (or merged after a partition).
    Resyncing,
    /// Not reachable (or its sidecar is not): writes go to its backlog.
    Down,
}

impl ReplicaState {
    pub fn name(self) -> &'static str {
        match self {
            ReplicaState::InSync => "in_sync",
            ReplicaState::CatchingUp => "catching_up",
            ReplicaState::Resyncing => "resyncing",
            ReplicaState::Down => "down",
        }
    }
    pub fn parse(s: &str) -> ReplicaState {
        match s {
            "in_sync" => ReplicaState::InSync,
            "catching_up" => ReplicaState::CatchingUp,
            "resyncing" => ReplicaState::Resyncing,
            _ => ReplicaState::Down,
        }
    }
}

/// Keys written while a replica could not receive them (for merging after a partition).
/// Past this many keys only "something was missed" is remembered.
const MISSED_KEYS_MAX: usize = 1 << 20;
/// Keys whose last write is remembered for WATCH.
const WATCH_TRACK_MAX: usize = 1 << 20;
/// Bytes per batch written to one stream.
const BATCH_BYTES: usize = 256 * 1024;

#[derive(Debug)]
enum Payload {
    Cmd {
        frame: Bytes,
        replies: u32,
    },
    /// Filled once the source replica answers (SPOP effect, key copy); nothing after it is
    /// sent until then.
    Pending,
    /// Nothing to send (an effect that turned out empty); acknowledged in order.
    Skip,
}

#[derive(Debug)]
struct Entry {
    seq: Seq,
    db: u32,
    proto: u8,
    payload: Payload,
    bytes: usize,
    /// A transaction that SELECTs: the connection's database is unknown afterwards.
    changes_db: bool,
    /// A key copy into this stream (resync/merge accounting).
    copy: bool,
}

#[derive(Debug)]
struct Expect {
    /// None: a SELECT/HELLO this module inserted.
    seq: Option<Seq>,
    left: u32,
    got: SmallVec<[Bytes; 1]>,
}

#[derive(Debug, Default)]
struct Resync {
    outstanding: usize,
    scan_done_at: Option<Seq>,
    /// Partition merge falling back to a rebuild: the key scan of our Redis starts only once
    /// the other side's keys copied into it (up to this seq) are there.
    scan_after: Option<Seq>,
}

/// One replica Redis and its ordered stream.
#[derive(Debug)]
pub struct Stream {
    /// The node whose Redis this is.
    pub node: String,
    pub addr: String,
    pub state: ReplicaState,
    connected: bool,
    /// False while the node's sidecar is unreachable: its Redis may then be written by a
    /// writer on the other side of a partition, so this one stops writing it.
    enabled: bool,
    log: VecDeque<Entry>,
    unsent: usize,
    bytes: usize,
    expect: VecDeque<Expect>,
    cur_db: Option<u32>,
    cur_proto: u8,
    needs_resync: bool,
    pub run_id: Option<String>,
    pub resyncs: u64,
    catchup_until: Seq,
    resync: Option<Resync>,
    missed: HashSet<(u32, Bytes)>,
    missed_all: bool,
    /// The shell should drop and reopen the connection (backlog overflow while connected).
    pub drop_conn: bool,
    /// Errors this replica answered to writes (other than the reference's): each one is a
    /// possible difference between the replicas, shown in the status.
    pub errors: u64,
    /// A partition merge decided while the connection was down: run once it is up.
    pending_merge: Option<Option<Vec<(u32, Bytes)>>>,
}

impl Stream {
    fn new(node: &str, addr: &str, needs_resync: bool) -> Stream {
        Stream {
            node: node.to_string(),
            addr: addr.to_string(),
            state: ReplicaState::Down,
            connected: false,
            enabled: true,
            log: VecDeque::new(),
            unsent: 0,
            bytes: 0,
            expect: VecDeque::new(),
            cur_db: None,
            cur_proto: 2,
            needs_resync,
            run_id: None,
            resyncs: 0,
            catchup_until: 0,
            resync: None,
            missed: HashSet::new(),
            missed_all: false,
            drop_conn: false,
            errors: 0,
            pending_merge: None,
        }
    }

    pub fn backlog_bytes(&self) -> usize {
        self.bytes
    }
    pub fn backlog_entries(&self) -> usize {
        self.log.len()
    }
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }
    /// Commands written and not answered yet (the stall watchdog's question).
    pub fn awaiting_replies(&self) -> bool {
        !self.expect.is_empty()
    }
    /// True when the shell has something to write on this stream.
    pub fn has_unsent(&self) -> bool {
        self.connected
            && self.enabled
            && !(self.needs_resync && self.state != ReplicaState::Resyncing)
            && self.log.get(self.unsent).is_some_and(|e| !matches!(e.payload, Payload::Pending))
    }

    fn clear_log(&mut self) {
        self.log.clear();
        self.unsent = 0;
        self.bytes = 0;
    }

    fn note_missed(&mut self, keys: Option<&[(u32, Bytes)]>) {
        match keys {
            Some(ks) if !self.missed_all => {
                for k in ks {
                    self.missed.insert(k.clone());
                }
                if self.missed.len() > MISSED_KEYS_MAX {
                    self.missed.clear();
                    self.missed_all = true;
                }
            }
            Some(_) => {}
            None => {
                self.missed.clear();
                self.missed_all = true;
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// The reply of the one command.
    Plain,
    /// A MULTI/EXEC block: EXEC's reply.
    Block,
    /// A blocking command run inside MULTI: the one element of EXEC's reply; a null means
    /// "would block" and parks the client.
    Blocking,
    /// PUBLISH/SPUBLISH: the receivers on every replica, summed (subscribers are spread over
    /// the nodes); answered once every replica in sync has run it.
    Sum,
}

#[derive(Debug)]
struct Waiter {
    seq: Seq,
    ticket: Ticket,
    read_only: bool,
    shape: Shape,
    reply: Option<(usize, Bytes)>,
    /// For `Shape::Blocking`: what to park if it would block.
    parked: Option<Parked>,
    /// A write to one of its keys was sequenced after it (a blocking pop that finds nothing
    /// is then tried again instead of parked).
    touched: bool,
    /// For writes shipped as effects: the stream that ran the original (the client's reply
    /// comes from it, not from the others' SREM).
    source: Option<usize>,
}

#[derive(Debug, Clone)]
struct Parked {
    ticket: Ticket,
    client_key: u64,
    db: u32,
    proto: u8,
    req: Request,
    keys: Vec<Bytes>,
    deadline_ms: Option<u64>,
}

#[derive(Debug)]
enum EffectKind {
    /// A block (or a lone command) containing SPOP: per command, the SPOP key if it is one.
    Block { cmds: Vec<Request>, spops: Vec<Option<FromReply>>, wrapped: bool },
    /// DUMP + PTTL on the source, RESTORE (or DEL) on `target`.
    Copy { key: Bytes, target: usize },
}

#[derive(Debug)]
struct Effect {
    source: usize,
    kind: EffectKind,
    /// What the source runs, kept so another replica can take over as source.
    source_frame: Bytes,
    source_replies: u32,
}

#[derive(Debug)]
struct Watch {
    seq: Seq,
    keys: Vec<(u32, Bytes)>,
}

/// Counters the status command shows.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub merged_keys: u64,
    pub conflict_keys: u64,
    pub lost_partition_writes: bool,
}

/// Who a request comes from and how to answer it.
#[derive(Debug, Clone, Copy)]
pub struct Origin {
    pub ticket: Ticket,
    /// Identifies the client across cores and nodes (WATCH state, parked pops).
    pub client_key: u64,
    pub db: u32,
    pub proto: u8,
}

/// The sequencer of a writer node.
pub struct Sequencer {
    pub streams: Vec<Stream>,
    next_seq: Seq,
    ack_all: bool,
    backlog_limit: usize,
    waiters: VecDeque<Waiter>,
    effects: crate::slot::IdMap<Seq, Effect>,
    parked: Vec<Parked>,
    watches: crate::slot::IdMap<u64, Watch>,
    last_write: HashMap<(u32, Bytes), Seq>,
    watch_floor: Seq,
    replies: Vec<(Ticket, Bytes)>,
    /// Streams that entered a full resync and need the shell's key scan.
    scans: Vec<usize>,
    /// Clients that disconnected recently: a pop of theirs still in flight is not parked.
    gone: VecDeque<u64>,
    /// Blocking pops sequenced and not answered yet (so the per-write checks for them cost
    /// nothing when there are none).
    blocking_in_flight: usize,
    pub counters: Counters,
}

fn frames_of(reqs: &[Request]) -> Bytes {
    if reqs.len() == 1 {
        return reqs[0].frame.clone();
    }
    let mut out = BytesMut::with_capacity(reqs.iter().map(|r| r.frame.len()).sum());
    for r in reqs {
        out.extend_from_slice(&r.frame);
    }
    out.freeze()
}

fn wrap_block(cmds: &[Request]) -> Vec<Request> {
    let mut v = Vec::with_capacity(cmds.len() + 2);
    v.push(Request::from_args(&[b"MULTI"]));
    v.extend(cmds.iter().cloned());
    v.push(Request::from_args(&[b"EXEC"]));
    v
}

/// The keys of a write, per database; `None` when they cannot be known (FLUSHALL, keyless
/// scripts, SWAPDB...): such a write conflicts with everything.
fn write_keys(db: u32, req: &Request) -> Option<SmallVec<[(u32, Bytes); 2]>> {
    let def = command::lookup(req)?;
    if def.name.eq_ignore_ascii_case("flushall")
        || def.name.eq_ignore_ascii_case("flushdb")
        || def.name.eq_ignore_ascii_case("swapdb")
        || def.name.eq_ignore_ascii_case("move")
        || def.name.eq_ignore_ascii_case("copy")
    {
        return None;
    }
    let idx = command::key_indices(def, req);
    if idx.is_empty() && !def.name.eq_ignore_ascii_case("publish") {
        return None;
    }
    Some(idx.iter().map(|&i| (db, req.arg_bytes(i))).collect())
}

/// The keys of every write in a stream's log (not yet acknowledged there); `true` when some
/// cannot be known.
fn log_keys(st: &Stream) -> (Vec<(u32, Bytes)>, bool) {
    let mut keys: Vec<(u32, Bytes)> = Vec::new();
    let mut unknown = false;
    for e in &st.log {
        match &e.payload {
            Payload::Cmd { frame, .. } if !e.copy => match frame_keys(e.db, frame) {
                Some(ks) => keys.extend(ks),
                None => unknown = true,
            },
            Payload::Pending if !e.copy => unknown = true,
            _ => {}
        }
    }
    (keys, unknown)
}

/// The keys of every write in a frame (one command or a MULTI block), by database.
fn frame_keys(db: u32, frame: &Bytes) -> Option<Vec<(u32, Bytes)>> {
    let mut buf = BytesMut::from(&frame[..]);
    let mut parser = crate::resp::RequestParser::new(usize::MAX >> 1);
    let mut db = db;
    let mut out = Vec::new();
    while let Ok(Some(r)) = parser.parse(&mut buf) {
        let name = r.arg(0);
        if name.eq_ignore_ascii_case(b"multi") || name.eq_ignore_ascii_case(b"exec") {
            continue;
        }
        if name.eq_ignore_ascii_case(b"select") && r.len() == 2 {
            db = crate::resp::parse_int(r.arg(1))?.max(0) as u32;
            continue;
        }
        if !command::replicates(command::lookup(&r), &r) {
            continue;
        }
        out.extend(write_keys(db, &r)?);
    }
    Some(out)
}

/// Seconds (a float) as milliseconds; `None` for 0 (block forever) or garbage.
fn timeout_ms(arg: &[u8], seconds: bool) -> Option<u64> {
    let s = std::str::from_utf8(arg).ok()?;
    let v: f64 = s.parse().ok()?;
    let ms = if seconds { v * 1000.0 } else { v };
    (ms > 0.0).then_some(ms as u64)
}

/// Where a blocking command's timeout is, and its unit.
fn blocking_deadline(req: &Request, now_ms: u64) -> Option<u64> {
    let name = req.arg(0);
    let n = req.len();
    let ms = if name.eq_ignore_ascii_case(b"blmpop") || name.eq_ignore_ascii_case(b"bzmpop") {
        timeout_ms(req.arg(1), true)
    } else if name.eq_ignore_ascii_case(b"xreadgroup") || name.eq_ignore_ascii_case(b"xread") {
        (1..n)
            .find(|&i| req.arg(i).eq_ignore_ascii_case(b"block") && i + 1 < n)
            .and_then(|i| timeout_ms(req.arg(i + 1), false))
    } else {
        timeout_ms(req.arg(n - 1), true)
    };
    ms.map(|m| now_ms + m)
}

impl Sequencer {
    /// A sequencer over `replicas` = (node id, Redis address, must be rebuilt before use);
    /// the first is the local Redis.
    pub fn new(replicas: &[(String, String, bool)], ack_all: bool, backlog_limit: usize) -> Sequencer {
        Sequencer {
            streams: replicas.iter().map(|(n, a, r)| Stream::new(n, a, *r)).collect(),
            next_seq: 1,
            ack_all,
            backlog_limit,
            waiters: VecDeque::new(),
            effects: Default::default(),
            parked: Vec::new(),
            watches: Default::default(),
            last_write: HashMap::new(),
            watch_floor: 0,
            replies: Vec::new(),
            scans: Vec::new(),
            gone: VecDeque::new(),
            blocking_in_flight: 0,
            counters: Counters::default(),
        }
    }

    /// Every replica is connected, enabled, in sync, with nothing waiting for it.
    pub fn all_in_sync(&self) -> bool {
        self.streams.iter().all(|s| s.connected && s.enabled && s.state == ReplicaState::InSync && s.log.is_empty())
    }

    /// The last sequence number handed out.
    pub fn last_seq(&self) -> Seq {
        self.next_seq - 1
    }

    /// Everything up to this seq has been applied by stream `s` (or was not for it).
    pub fn acked_upto(&self, s: usize) -> Seq {
        let st = &self.streams[s];
        match st.log.front() {
            Some(e) => e.seq - 1,
            None if !st.expect.iter().any(|e| e.seq.is_some()) => self.next_seq - 1,
            None => st.expect.iter().find_map(|e| e.seq).map(|s| s - 1).unwrap_or(self.next_seq - 1),
        }
    }

    /// The replica whose replies clients get: the local Redis if in sync, else the first
    /// in-sync one.
    pub fn primary(&self) -> Option<usize> {
        self.streams.iter().position(|s| s.state == ReplicaState::InSync)
    }

    /// Replies ready for clients.
    pub fn take_replies(&mut self) -> Vec<(Ticket, Bytes)> {
        std::mem::take(&mut self.replies)
    }

    /// Streams whose full resync needs a key scan started by the shell.
    pub fn take_scans(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.scans)
    }

    /// Nothing in flight, nothing parked, no backlog to an in-sync replica: safe to hand
    /// the writer role over.
    pub fn is_idle(&self) -> bool {
        self.waiters.is_empty()
            && self.effects.is_empty()
            && self.streams.iter().all(|s| !s.connected || !s.enabled || (s.log.is_empty() && s.expect.is_empty()))
    }

    /// Blocked clients, for handing over to the next writer.
    pub fn take_parked(&mut self) -> Vec<(Ticket, u64, u32, u8, WriterRequest)> {
        self.parked
            .drain(..)
            .map(|p| (p.ticket, p.client_key, p.db, p.proto, WriterRequest::One { req: p.req, write: true }))
            .collect()
    }

    /// A client went away: forget its WATCH and blocked pops. Returns the tickets of the
    /// pops, which will never be answered.
    pub fn client_gone(&mut self, client_key: u64) -> Vec<Ticket> {
        self.watches.remove(&client_key);
        self.gone.push_back(client_key);
        if self.gone.len() > 1024 {
            self.gone.pop_front();
        }
        let mut gone = Vec::new();
        self.parked.retain(|p| {
            if p.client_key == client_key {
                gone.push(p.ticket);
                false
            } else {
                true
            }
        });
        self.stop_tracking_if_idle();
        gone
    }

    fn stop_tracking_if_idle(&mut self) {
        if self.watches.is_empty() && !self.last_write.is_empty() {
            self.last_write.clear();
        }
    }

    fn error(&mut self, ticket: Ticket, msg: &str) {
        self.replies.push((ticket, resp::error(msg)));
    }

    /// Sequence one client request: one command (`write`: it must reach every replica, else
    /// it runs on the primary only), or a MULTI … EXEC block.
    pub fn submit(&mut self, o: Origin, work: WriterRequest, now_ms: u64) {
        // Requests come from clients and peers: check what the table can before anything
        // below indexes arguments (Redis's own error for the client).
        let checked: &[Request] = match &work {
            WriterRequest::One { req, .. } => std::slice::from_ref(req),
            WriterRequest::Block { queued, .. } => queued,
        };
        for r in checked {
            if r.is_empty() {
                return self.error(o.ticket, "ERR resplica: empty request on the writer path");
            }
            if let Some(msg) = command::lookup(r).and_then(|d| command::arity_error(d, r)) {
                return self.error(o.ticket, &msg);
            }
        }
        if let WriterRequest::One { req, .. } = &work {
            if req.arg(0).eq_ignore_ascii_case(b"watch") {
                return self.watch(o, req);
            }
            if req.arg(0).eq_ignore_ascii_case(b"unwatch") {
                self.watches.remove(&o.client_key);
                self.stop_tracking_if_idle();
                self.replies.push((o.ticket, resp::simple("OK")));
                return;
            }
        }
        let Some(primary) = self.primary() else {
            let names: Vec<&str> = self.streams.iter().map(|s| s.addr.as_str()).collect();
            return self
                .error(o.ticket, &format!("ERR resplica: no Redis in sync is reachable ({})", names.join(", ")));
        };
        let (req, write) = match work {
            WriterRequest::Block { queued, watched } => {
                // MULTI ... EXEC: the client's WATCH is checked here, where every write is
                // seen. A watched block without a record of the WATCH here (the writer
                // changed since) cannot be checked: abort it.
                let record = self.watches.remove(&o.client_key);
                let touched = match &record {
                    None => true,
                    Some(w) => {
                        w.seq < self.watch_floor
                            || w.keys.iter().any(|k| self.last_write.get(k).is_some_and(|&s| s > w.seq))
                    }
                };
                self.stop_tracking_if_idle();
                if watched && touched {
                    self.replies.push((o.ticket, facts::null_array(o.proto)));
                    return;
                }
                return self.submit_block(o, primary, queued, Shape::Block, None, now_ms);
            }
            WriterRequest::One { req, write } => (req, write),
        };
        let flags = command::lookup(&req).map(|d| d.flags).unwrap_or(0);
        if write && flags & F_BLOCKING != 0 && facts::blocks(&req, flags) {
            let keys: Vec<Bytes> = command::lookup(&req)
                .map(|d| command::key_indices(d, &req).iter().map(|&i| req.arg_bytes(i)).collect())
                .unwrap_or_default();
            let parked = Parked {
                ticket: o.ticket,
                client_key: o.client_key,
                db: o.db,
                proto: o.proto,
                req: req.clone(),
                keys,
                deadline_ms: blocking_deadline(&req, now_ms),
            };
            return self.submit_block(o, primary, vec![req], Shape::Blocking, Some(parked), now_ms);
        }
        if !write {
            let seq = self.alloc();
            self.push_entry(primary, seq, o.db, o.proto, Payload::Cmd { frame: req.frame.clone(), replies: 1 }, false);
            self.waiters.push_back(Waiter {
                seq,
                ticket: o.ticket,
                read_only: true,
                shape: Shape::Plain,
                reply: None,
                parked: None,
                touched: false,
                source: None,
            });
            return;
        }
        let shipped = effects::rewrite(req, now_ms);
        if shipped.from_reply.is_some() {
            return self.submit_block(o, primary, vec![shipped.req], Shape::Plain, None, now_ms);
        }
        let keys = self.note_write(o.db, &shipped.req);
        let seq = self.alloc();
        let frame = shipped.req.frame.clone();
        for s in 0..self.streams.len() {
            if self.receives(s) {
                self.push_entry(s, seq, o.db, o.proto, Payload::Cmd { frame: frame.clone(), replies: 1 }, false);
            }
        }
        self.note_missed_all(keys.as_deref());
        let publish =
            shipped.req.arg(0).eq_ignore_ascii_case(b"publish") || shipped.req.arg(0).eq_ignore_ascii_case(b"spublish");
        self.waiters.push_back(Waiter {
            seq,
            ticket: o.ticket,
            read_only: false,
            shape: if publish { Shape::Sum } else { Shape::Plain },
            reply: None,
            parked: None,
            touched: false,
            source: None,
        });
        self.wake_parked(keys.as_deref(), now_ms);
    }

    /// MULTI/EXEC blocks, SPOP (a block of one, unwrapped) and blocking commands (run inside
    /// MULTI, where Redis never blocks).
    fn submit_block(
        &mut self,
        o: Origin,
        primary: usize,
        cmds: Vec<Request>,
        shape: Shape,
        parked: Option<Parked>,
        now_ms: u64,
    ) {
        let shipped: Vec<Shipped> = cmds.into_iter().map(|r| effects::rewrite(r, now_ms)).collect();
        let mut all_keys: Option<Vec<(u32, Bytes)>> = Some(Vec::new());
        let mut db = o.db;
        let mut changes_db = false;
        for s in &shipped {
            if s.req.arg(0).eq_ignore_ascii_case(b"select") {
                changes_db = true;
                if let Some(d) = crate::resp::parse_int(s.req.arg(1)) {
                    db = d.max(0) as u32;
                }
                continue;
            }
            let ks = self.note_write(db, &s.req);
            match (ks, &mut all_keys) {
                (Some(ks), Some(all)) => all.extend(ks),
                _ => all_keys = None,
            }
        }
        let has_spop = shipped.iter().any(|s| s.from_reply.is_some());
        let wrapped = shape != Shape::Plain;
        let reqs: Vec<Request> = shipped.iter().map(|s| s.req.clone()).collect();
        let to_send = if wrapped { wrap_block(&reqs) } else { reqs.clone() };
        let frame = frames_of(&to_send);
        let replies = to_send.len() as u32;
        let seq = self.alloc();
        if has_spop {
            let spops = shipped.iter().map(|s| s.from_reply.clone()).collect();
            self.push_entry(primary, seq, o.db, o.proto, Payload::Cmd { frame: frame.clone(), replies }, changes_db);
            for s in 0..self.streams.len() {
                if s != primary && self.receives(s) {
                    self.push_entry(s, seq, o.db, o.proto, Payload::Pending, changes_db);
                }
            }
            self.effects.insert(
                seq,
                Effect {
                    source: primary,
                    kind: EffectKind::Block { cmds: reqs, spops, wrapped },
                    source_frame: frame,
                    source_replies: replies,
                },
            );
        } else {
            for s in 0..self.streams.len() {
                if self.receives(s) {
                    self.push_entry(s, seq, o.db, o.proto, Payload::Cmd { frame: frame.clone(), replies }, changes_db);
                }
            }
        }
        self.note_missed_all(all_keys.as_deref());
        if shape == Shape::Blocking {
            self.blocking_in_flight += 1;
        }
        self.waiters.push_back(Waiter {
            seq,
            ticket: o.ticket,
            read_only: false,
            shape,
            reply: None,
            parked,
            touched: false,
            source: has_spop.then_some(primary),
        });
        if shape != Shape::Blocking {
            self.wake_parked(all_keys.as_deref(), now_ms);
        }
    }

    fn watch(&mut self, o: Origin, req: &Request) {
        if req.len() < 2 {
            return self.error(o.ticket, "ERR wrong number of arguments for 'watch' command");
        }
        // Writes are tracked only while someone watches: everything before now counts as
        // "not touched since" for this watch.
        let seq = self.next_seq - 1;
        let w = self.watches.entry(o.client_key).or_insert(Watch { seq, keys: Vec::new() });
        w.keys.extend((1..req.len()).map(|i| (o.db, req.arg_bytes(i))));
        // Answered once every write sequenced before it is applied: what the client reads
        // next is then at least as new as the watch point.
        let at = self.alloc();
        self.waiters.push_back(Waiter {
            seq: at,
            ticket: o.ticket,
            read_only: false,
            shape: Shape::Plain,
            reply: Some((usize::MAX, resp::simple("OK"))),
            parked: None,
            touched: false,
            source: None,
        });
        self.release();
    }

    /// Remember a write's keys for WATCH; returns them (None = unknown keys).
    fn note_write(&mut self, db: u32, req: &Request) -> Option<Vec<(u32, Bytes)>> {
        let tracking = !self.watches.is_empty();
        let need = tracking
            || !self.parked.is_empty()
            || self.blocking_in_flight > 0
            || self.streams.iter().any(|s| s.state != ReplicaState::InSync);
        if !need {
            return Some(Vec::new());
        }
        let seq = self.next_seq;
        match write_keys(db, req) {
            Some(ks) => {
                if tracking {
                    if self.last_write.len() > WATCH_TRACK_MAX {
                        self.last_write.clear();
                        self.watch_floor = seq;
                    }
                    for k in &ks {
                        self.last_write.insert(k.clone(), seq);
                    }
                }
                Some(ks.into_vec())
            }
            None => {
                if tracking {
                    self.watch_floor = seq;
                }
                None
            }
        }
    }

    fn note_missed_all(&mut self, keys: Option<&[(u32, Bytes)]>) {
        for s in &mut self.streams {
            if s.state != ReplicaState::InSync && (s.state == ReplicaState::Down || !s.enabled) {
                s.note_missed(keys);
            }
        }
    }

    /// Retry parked blocking commands whose keys this write touched.
    fn wake_parked(&mut self, keys: Option<&[(u32, Bytes)]>, now_ms: u64) {
        let touches = |p: &Parked| match keys {
            None => true,
            Some(ks) => p.keys.iter().any(|k| ks.iter().any(|(d, kk)| *d == p.db && kk == k)),
        };
        if self.blocking_in_flight > 0 {
            // Pops still in flight: one that finds nothing must be tried again, after this.
            for w in self.waiters.iter_mut() {
                if w.parked.as_ref().is_some_and(touches) {
                    w.touched = true;
                }
            }
        }
        if self.parked.is_empty() {
            return;
        }
        let (woken, keep): (Vec<Parked>, Vec<Parked>) = std::mem::take(&mut self.parked).into_iter().partition(touches);
        self.parked = keep;
        for p in woken {
            self.retry_pop(p, now_ms);
        }
    }

    /// Try a parked (or just failed) blocking pop again, at the current end of the order.
    fn retry_pop(&mut self, p: Parked, now_ms: u64) {
        let Some(primary) = self.primary() else {
            self.parked.push(p);
            return;
        };
        let o = Origin { ticket: p.ticket, client_key: p.client_key, db: p.db, proto: p.proto };
        let req = p.req.clone();
        self.submit_block(o, primary, vec![req], Shape::Blocking, Some(p), now_ms);
    }

    /// Time passes: blocked clients whose timeout expired get their null reply.
    pub fn tick(&mut self, now_ms: u64) {
        let mut i = 0;
        while i < self.parked.len() {
            if self.parked[i].deadline_ms.is_some_and(|d| d <= now_ms) {
                let p = self.parked.swap_remove(i);
                let null = facts::timeout_reply(&p.req, p.proto);
                self.replies.push((p.ticket, null));
            } else {
                i += 1;
            }
        }
    }

    fn alloc(&mut self) -> Seq {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// Whether stream `s` gets (or backlogs) new writes.
    fn receives(&self, s: usize) -> bool {
        let st = &self.streams[s];
        !(st.needs_resync && st.state != ReplicaState::Resyncing)
    }

    fn push_entry(&mut self, s: usize, seq: Seq, db: u32, proto: u8, payload: Payload, changes_db: bool) {
        let bytes = match &payload {
            Payload::Cmd { frame, .. } => frame.len() + 16,
            _ => 64,
        };
        let limit = self.backlog_limit;
        let is_primary = self.primary() == Some(s);
        let st = &mut self.streams[s];
        st.log.push_back(Entry { seq, db, proto, payload, bytes, changes_db, copy: false });
        st.bytes += bytes;
        if st.bytes > limit && !is_primary {
            warn!(replica = %st.node, redis = %st.addr, limit, "backlog overflowed: the replica will be fully resynced");
            st.clear_log();
            st.needs_resync = true;
            st.resync = None;
            st.state = ReplicaState::Down;
            if st.connected {
                st.drop_conn = true;
            }
        }
    }

    /// The next batch of frames to write on stream `s` (SELECT/HELLO inserted as needed), as
    /// buffers to write in order: large frames are shared with the log, not copied.
    pub fn take_batch(&mut self, s: usize) -> Option<VecDeque<Bytes>> {
        if !self.streams[s].has_unsent() {
            return None;
        }
        let st = &mut self.streams[s];
        let mut out = resp::WriteBatch::default();
        while out.len() < BATCH_BYTES {
            let Some(e) = st.log.get(st.unsent) else { break };
            match &e.payload {
                Payload::Pending => break,
                Payload::Skip => {
                    st.expect.push_back(Expect { seq: Some(e.seq), left: 0, got: SmallVec::new() });
                }
                Payload::Cmd { frame, replies } => {
                    if st.cur_db != Some(e.db) {
                        out.push(&crate::command::frames::select(e.db));
                        st.expect.push_back(Expect { seq: None, left: 1, got: SmallVec::new() });
                        st.cur_db = Some(e.db);
                    }
                    let proto = if e.proto >= 3 { 3 } else { 2 };
                    if st.cur_proto != proto {
                        out.push(&crate::command::frames::hello(proto));
                        st.expect.push_back(Expect { seq: None, left: 1, got: SmallVec::new() });
                        st.cur_proto = proto;
                    }
                    out.push(frame);
                    st.expect.push_back(Expect { seq: Some(e.seq), left: *replies, got: SmallVec::new() });
                    if e.changes_db {
                        st.cur_db = None;
                    }
                }
            }
            st.unsent += 1;
        }
        // Skipped entries with nothing in flight before them are done now (no reply will
        // come to complete them).
        self.drain_empty_expects(s, 0);
        self.release();
        Some(out.take())
    }

    /// A reply arrived on stream `s`. `Err` means the stream is out of step (drop it).
    pub fn on_reply(&mut self, s: usize, reply: Bytes, now_ms: u64) -> Result<(), &'static str> {
        self.drain_empty_expects(s, now_ms);
        {
            let st = &mut self.streams[s];
            let Some(front) = st.expect.front_mut() else { return Err("a reply nobody asked for") };
            if front.seq.is_none() {
                if resp::is_error(&reply) {
                    warn!(redis = %st.addr, reply = %String::from_utf8_lossy(&reply).trim_end(), "SELECT/HELLO refused");
                }
                st.expect.pop_front();
                self.drain_empty_expects(s, now_ms);
                return Ok(());
            }
            front.got.push(reply);
            front.left = front.left.saturating_sub(1);
            if front.left > 0 {
                return Ok(());
            }
        }
        let Some(done) = self.streams[s].expect.pop_front() else { return Ok(()) };
        if let Some(seq) = done.seq {
            self.complete(s, seq, done.got, now_ms);
        }
        self.drain_empty_expects(s, now_ms);
        self.release();
        Ok(())
    }

    fn drain_empty_expects(&mut self, s: usize, now_ms: u64) {
        while self.streams[s].expect.front().is_some_and(|e| e.left == 0 && e.seq.is_some()) {
            if let Some(e) = self.streams[s].expect.pop_front() {
                if let Some(seq) = e.seq {
                    self.complete(s, seq, e.got, now_ms);
                }
            }
        }
    }

    fn complete(&mut self, s: usize, seq: Seq, got: SmallVec<[Bytes; 1]>, now_ms: u64) {
        let mut was_copy = false;
        {
            let st = &mut self.streams[s];
            if st.log.front().is_some_and(|e| e.seq == seq) {
                if let Some(e) = st.log.pop_front() {
                    st.bytes -= e.bytes;
                    st.unsent = st.unsent.saturating_sub(1);
                    was_copy = e.copy;
                }
            }
        }
        if was_copy {
            if let Some(r) = self.streams[s].resync.as_mut() {
                r.outstanding = r.outstanding.saturating_sub(1);
            }
        }
        // An effect whose source just answered: fill the other replicas' placeholders.
        if self.effects.get(&seq).is_some_and(|e| e.source == s) {
            if let Some(eff) = self.effects.remove(&seq) {
                self.apply_effect(seq, eff, &got, now_ms);
            }
        }
        if let Some(last) = got.last() {
            if resp::is_error(last) && s != 0 {
                self.streams[s].errors += 1;
            }
            if let Ok(i) = self.waiters.binary_search_by_key(&seq, |w| w.seq) {
                let primary = self.primary();
                let w = &mut self.waiters[i];
                if w.source.is_some_and(|src| src != s) {
                    // The others ran the effect (SREM ...), not what the client sent.
                    self.check_progress(s);
                    return;
                }
                if w.shape == Shape::Sum {
                    let before = w.reply.as_ref().and_then(|(_, r)| reply::int(r)).unwrap_or(0);
                    match reply::int(last) {
                        Some(n) => w.reply = Some((s, resp::int(before + n))),
                        None if w.reply.is_none() => w.reply = Some((s, last.clone())),
                        None => {}
                    }
                    self.check_progress(s);
                    return;
                }
                let reply = match w.shape {
                    Shape::Plain if got.len() == 1 => got[0].clone(),
                    Shape::Plain => {
                        // SPOP shipped as a block of one, unwrapped: its own reply.
                        got[got.len() - 1].clone()
                    }
                    _ => last.clone(),
                };
                if w.reply.is_none() || Some(s) == primary {
                    w.reply = Some((s, reply));
                }
            }
        }
        self.check_progress(s);
    }

    fn apply_effect(&mut self, seq: Seq, eff: Effect, got: &[Bytes], now_ms: u64) {
        match eff.kind {
            EffectKind::Copy { key, target } => {
                let (dump, pttl) = match got {
                    [d, p] => (d.clone(), p.clone()),
                    _ => return,
                };
                let req = effects::copy_effect(&key, &dump, &pttl, now_ms);
                self.fill(target, seq, Some((req.frame.clone(), 1)));
            }
            EffectKind::Block { cmds, spops, wrapped } => {
                let results: Option<Vec<Bytes>> =
                    if wrapped { got.last().and_then(reply::elements) } else { got.last().map(|r| vec![r.clone()]) };
                let frame = results.filter(|r| r.len() == cmds.len()).map(|results| {
                    let reqs: Vec<Request> = cmds
                        .iter()
                        .zip(&spops)
                        .zip(&results)
                        .filter_map(|((c, sp), r)| match sp {
                            Some(fr) => fr.effect(c, r),
                            None => Some(c.clone()),
                        })
                        .collect();
                    reqs
                });
                let fill = match frame {
                    Some(reqs) if reqs.is_empty() => None,
                    Some(reqs) if wrapped => {
                        let all = wrap_block(&reqs);
                        Some((frames_of(&all), all.len() as u32))
                    }
                    Some(reqs) => Some((frames_of(&reqs), reqs.len() as u32)),
                    None => None,
                };
                for t in 0..self.streams.len() {
                    if t != eff.source {
                        self.fill(t, seq, fill.clone());
                    }
                }
            }
        }
    }

    fn fill(&mut self, s: usize, seq: Seq, with: Option<(Bytes, u32)>) {
        let st = &mut self.streams[s];
        if let Ok(i) = st.log.binary_search_by_key(&seq, |e| e.seq) {
            let e = &mut st.log[i];
            if matches!(e.payload, Payload::Pending) {
                e.payload = match with {
                    Some((frame, replies)) => {
                        st.bytes += frame.len();
                        e.bytes += frame.len();
                        Payload::Cmd { frame, replies }
                    }
                    None => Payload::Skip,
                };
            }
        }
    }

    /// Start the key scans that waited for copies into the reference Redis to land.
    fn start_deferred_scans(&mut self) {
        let Some(p) = self.primary() else { return };
        let applied = self.acked_upto(p);
        for t in 0..self.streams.len() {
            let ready = self.streams[t].resync.as_ref().and_then(|r| r.scan_after).is_some_and(|at| applied >= at);
            if ready {
                if let Some(r) = self.streams[t].resync.as_mut() {
                    r.scan_after = None;
                }
                self.scans.push(t);
            }
        }
    }

    /// A stream's catch-up or resync may have just finished.
    fn check_progress(&mut self, s: usize) {
        if self.streams.iter().any(|st| st.resync.as_ref().is_some_and(|r| r.scan_after.is_some())) {
            self.start_deferred_scans();
        }
        let acked = self.acked_upto(s);
        let st = &mut self.streams[s];
        let done = match st.state {
            ReplicaState::CatchingUp => acked >= st.catchup_until,
            ReplicaState::Resyncing => st.resync.as_ref().and_then(|r| r.scan_done_at).is_some_and(|at| acked >= at),
            _ => false,
        };
        if done {
            info!(replica = %st.node, redis = %st.addr, was = st.state.name(), "replica in sync");
            st.state = ReplicaState::InSync;
            st.resync = None;
            st.missed.clear();
            st.missed_all = false;
            self.evaluate_all();
        }
    }

    /// Deliver every waiter at the front whose acknowledgement rule is met.
    fn release(&mut self) {
        let mut retry = Vec::new();
        self.release_into(&mut retry);
        for p in retry {
            self.retry_pop(p, 0);
        }
    }

    fn release_into(&mut self, retry: &mut Vec<Parked>) {
        let primary = self.primary();
        while let Some(w) = self.waiters.front() {
            if !self.satisfied(w, primary) {
                break;
            }
            let Some(w) = self.waiters.pop_front() else { break };
            if w.shape == Shape::Blocking {
                self.blocking_in_flight = self.blocking_in_flight.saturating_sub(1);
            }
            let Some((_, reply)) = w.reply else { continue };
            if w.shape == Shape::Blocking {
                match reply::elements(&reply) {
                    Some(inner) if inner.len() == 1 => {
                        if reply::is_null(&inner[0]) {
                            if let Some(p) = w.parked {
                                if self.gone.contains(&p.client_key) {
                                    continue;
                                }
                                if w.touched {
                                    // A write to its keys came after it: try again, after it.
                                    retry.push(p);
                                } else {
                                    self.parked.push(p);
                                }
                                continue;
                            }
                        }
                        self.replies.push((w.ticket, inner[0].clone()));
                    }
                    _ => self.replies.push((w.ticket, reply)),
                }
                continue;
            }
            self.replies.push((w.ticket, reply));
        }
    }

    fn satisfied(&self, w: &Waiter, primary: Option<usize>) -> bool {
        if w.reply.is_none() {
            return false;
        }
        if w.read_only {
            return true;
        }
        if let Some(p) = primary {
            if self.acked_upto(p) < w.seq {
                return false;
            }
        }
        if self.ack_all || w.shape == Shape::Sum {
            for (i, s) in self.streams.iter().enumerate() {
                if s.state == ReplicaState::InSync && self.acked_upto(i) < w.seq {
                    return false;
                }
            }
        }
        true
    }

    /// The shell connected stream `s` to its Redis, whose INFO says `run_id`.
    pub fn on_up(&mut self, s: usize, run_id: &str) {
        let st = &mut self.streams[s];
        st.connected = true;
        st.drop_conn = false;
        st.cur_db = None;
        st.cur_proto = 2;
        st.expect.clear();
        st.unsent = 0;
        if st.run_id.as_deref().is_some_and(|old| old != run_id) {
            warn!(replica = %st.node, redis = %st.addr, "Redis restarted (run_id changed): full resync");
            st.needs_resync = true;
        }
        st.run_id = Some(run_id.to_string());
        self.evaluate_all();
    }

    /// Stream `s` lost its connection.
    pub fn on_down(&mut self, s: usize, reason: &str) {
        let in_flight;
        {
            let st = &mut self.streams[s];
            if !st.connected {
                return;
            }
            st.connected = false;
            in_flight = st.expect.iter().any(|e| e.seq.is_some());
            warn!(replica = %st.node, redis = %st.addr, in_flight, "replica connection lost: {reason}");
            st.expect.clear();
            st.unsent = 0;
            st.cur_db = None;
            if in_flight || st.state == ReplicaState::Resyncing {
                // Which in-flight writes were applied is unknowable: rebuild it later. Their
                // keys count as missed (a partition merge must copy them).
                let (keys, unknown) = log_keys(st);
                if unknown {
                    st.note_missed(None);
                } else {
                    st.note_missed(Some(&keys));
                }
                st.needs_resync = true;
                st.resync = None;
                st.clear_log();
            }
            st.state = ReplicaState::Down;
        }
        self.after_loss(s);
    }

    /// The node's sidecar became unreachable (false) or reachable again (true). When it
    /// returns, `rebuild` says continuity cannot be proven (it restarted).
    pub fn set_enabled(&mut self, s: usize, enabled: bool, rebuild: bool) {
        let st = &mut self.streams[s];
        if st.enabled == enabled && !rebuild {
            return;
        }
        st.enabled = enabled;
        if rebuild {
            st.needs_resync = true;
            st.resync = None;
            st.clear_log();
        }
        if !enabled {
            // Writes not yet applied there: their keys count as missed for a merge.
            let (keys, unknown) = log_keys(st);
            st.note_missed(if unknown { None } else { Some(&keys) });
            if st.state == ReplicaState::Resyncing {
                st.needs_resync = true;
                st.resync = None;
                st.clear_log();
            }
            st.state = ReplicaState::Down;
            self.after_loss(s);
        } else {
            if rebuild && st.connected {
                // Drop what is in flight too: reconnecting starts the rebuild cleanly.
                st.drop_conn = true;
            }
            self.evaluate_all();
        }
    }

    /// After stream `s` stopped applying: move effects it was the source of, fail reads only
    /// it could answer, abort resyncs it fed, release what no longer waits for it.
    fn after_loss(&mut self, s: usize) {
        let moved: Vec<Seq> = self.effects.iter().filter(|(_, e)| e.source == s).map(|(k, _)| *k).collect();
        for seq in moved {
            let new_source = (0..self.streams.len()).find(|&t| {
                t != s
                    && self.streams[t].state == ReplicaState::InSync
                    && self.streams[t].log.binary_search_by_key(&seq, |e| e.seq).is_ok()
            });
            match (new_source, self.effects.remove(&seq)) {
                (Some(t), Some(mut eff)) if !matches!(eff.kind, EffectKind::Copy { .. }) => {
                    let (frame, replies) = (eff.source_frame.clone(), eff.source_replies);
                    self.fill(t, seq, Some((frame, replies)));
                    eff.source = t;
                    self.effects.insert(seq, eff);
                    // The old source, if it replays its backlog later, must get the effect,
                    // not run the original again (another member would be popped).
                    if let Ok(i) = self.streams[s].log.binary_search_by_key(&seq, |e| e.seq) {
                        if i >= self.streams[s].unsent {
                            self.streams[s].log[i].payload = Payload::Pending;
                        }
                    }
                    if let Ok(i) = self.waiters.binary_search_by_key(&seq, |w| w.seq) {
                        self.waiters[i].source = Some(t);
                    }
                }
                (_, Some(eff)) => {
                    if let EffectKind::Copy { target, key } = eff.kind {
                        // The copy will never come: unblock the target's stream.
                        self.fill(target, seq, None);
                        if self.streams[target].state != ReplicaState::Resyncing {
                            warn!(key = %String::from_utf8_lossy(&key), "a partition merge copy was lost with its source");
                            self.counters.lost_partition_writes = true;
                        }
                        self.abort_resync(target, "its source replica went down");
                    } else {
                        // Nobody in sync can run it instead: it is not applied anywhere, and
                        // its client learns that.
                        for t in 0..self.streams.len() {
                            self.fill(t, seq, None);
                        }
                        if let Ok(i) = self.waiters.binary_search_by_key(&seq, |w| w.seq) {
                            let addr = &self.streams[s].addr;
                            self.waiters[i].reply = Some((
                                s,
                                resp::error(&format!(
                                    "ERR resplica: connection to Redis at {addr} lost before it answered"
                                )),
                            ));
                            self.waiters[i].read_only = true;
                            self.waiters[i].source = None;
                        }
                    }
                }
                _ => {}
            }
        }
        for t in 0..self.streams.len() {
            if t != s && self.streams[t].state == ReplicaState::Resyncing && self.primary().is_none() {
                self.abort_resync(t, "no replica in sync is left to copy from");
            }
        }
        let addr = self.streams[s].addr.clone();
        self.fail_orphans(&addr);
        self.release();
    }

    /// Waiters whose command no reachable replica holds any more (its connection died, its
    /// log was dropped for a rebuild) get an error now instead of waiting forever.
    fn fail_orphans(&mut self, addr: &str) {
        let mut failed = Vec::new();
        for w in &self.waiters {
            if w.reply.is_some() {
                continue;
            }
            let held = self.streams.iter().any(|st| {
                st.connected && st.enabled && st.log.binary_search_by_key(&w.seq, |e| e.seq).is_ok()
                    || st.expect.iter().any(|e| e.seq == Some(w.seq))
            });
            if !held {
                failed.push(w.seq);
            }
        }
        for seq in failed {
            if let Ok(i) = self.waiters.binary_search_by_key(&seq, |w| w.seq) {
                self.waiters[i].reply = Some((
                    usize::MAX,
                    resp::error(&format!(
                        "ERR resplica: connection to Redis at {addr} lost before it answered \
                         (the command may or may not have been applied)"
                    )),
                ));
                self.waiters[i].read_only = true;
                self.waiters[i].source = None;
            }
        }
    }

    /// Give up the resync of `t` (its source went down, its key scan failed): it starts
    /// again on a new connection.
    pub fn abort_resync(&mut self, t: usize, why: &str) {
        let st = &mut self.streams[t];
        if st.state == ReplicaState::Resyncing {
            warn!(replica = %st.node, "resync aborted: {why}");
            st.needs_resync = true;
            st.resync = None;
            st.clear_log();
            st.state = ReplicaState::Down;
            if st.connected {
                st.drop_conn = true;
            }
        }
    }

    /// Re-decide every down stream that could start (catch-up, resync, or in sync).
    fn evaluate_all(&mut self) {
        // A new writer: the first replica not marked for rebuilding becomes the reference
        // (the local Redis, unless it was not in sync when this node took the role). Only if
        // every replica is reachable and every one needs rebuilding (all restarted empty)
        // does the local one become the reference anyway.
        if self.primary().is_none() {
            let ready = |st: &Stream| st.connected && st.enabled && st.state == ReplicaState::Down && st.log.is_empty();
            let pick = (0..self.streams.len())
                .find(|&i| ready(&self.streams[i]) && !self.streams[i].needs_resync)
                .or_else(|| {
                    self.streams
                        .iter()
                        .all(|st| st.connected && st.enabled && st.needs_resync && st.state == ReplicaState::Down)
                        .then_some(0)
                });
            if let Some(i) = pick {
                let st = &mut self.streams[i];
                if st.needs_resync {
                    warn!(redis = %st.addr, "every Redis needs rebuilding: the local one becomes the reference copy");
                    // Its backlog was for a copy that is gone; what it holds now is the reference.
                    st.clear_log();
                }
                st.needs_resync = false;
                st.state = ReplicaState::InSync;
                info!(replica = %st.node, redis = %st.addr, "replica in sync (reference)");
            }
        }
        for s in 0..self.streams.len() {
            let st = &self.streams[s];
            if !st.connected || !st.enabled || st.state != ReplicaState::Down || st.drop_conn {
                continue;
            }
            if let Some(theirs) = self.streams[s].pending_merge.take() {
                self.start_merge(s, theirs);
                continue;
            }
            if self.streams[s].needs_resync {
                self.start_resync(s);
            } else {
                let until = self.next_seq - 1;
                let st = &mut self.streams[s];
                if st.log.is_empty() {
                    st.state = ReplicaState::InSync;
                    st.missed.clear();
                    st.missed_all = false;
                    info!(replica = %st.node, redis = %st.addr, "replica in sync");
                } else {
                    st.state = ReplicaState::CatchingUp;
                    st.catchup_until = until;
                    info!(replica = %st.node, redis = %st.addr, entries = st.log.len(), "replaying backlog");
                }
            }
        }
        self.fail_orphans("(replica rebuilt)");
        self.release();
    }

    /// Begin rebuilding stream `t`: FLUSHALL, then the shell scans the source's keys and
    /// calls `copy_key` for each, while new writes keep flowing to `t` in order.
    fn start_resync(&mut self, t: usize) {
        let Some(_) = self.primary().filter(|&p| p != t) else { return };
        let seq = self.alloc();
        let st = &mut self.streams[t];
        info!(replica = %st.node, redis = %st.addr, "full resync started");
        st.clear_log();
        st.needs_resync = false;
        st.state = ReplicaState::Resyncing;
        st.resync = Some(Resync::default());
        st.resyncs += 1;
        st.missed.clear();
        st.missed_all = false;
        let flush = Request::from_args(&[b"FLUSHALL"]);
        self.push_entry(t, seq, 0, 2, Payload::Cmd { frame: flush.frame, replies: 1 }, false);
        self.scans.push(t);
    }

    /// The stream a resync of `t` copies from, while it is in progress.
    pub fn resync_source(&self, t: usize) -> Option<usize> {
        (self.streams[t].state == ReplicaState::Resyncing).then(|| self.primary()).flatten().filter(|&p| p != t)
    }

    /// Key copies queued for `t` and not yet applied (the shell throttles on it).
    pub fn copies_outstanding(&self, t: usize) -> usize {
        self.streams[t].resync.as_ref().map(|r| r.outstanding).unwrap_or(0)
    }

    /// Copy one key from stream `source` to stream `target` at this point of the order:
    /// DUMP + PTTL on the source, RESTORE ... REPLACE (or DEL) on the target.
    pub fn copy_key(&mut self, db: u32, key: Bytes, source: usize, target: usize) -> bool {
        if !self.streams[source].connected || self.streams[target].resync.is_none() {
            return false;
        }
        let seq = self.alloc();
        let frame = frames_of(&[
            Request::from_args(&[b"DUMP".as_slice(), &key]),
            Request::from_args(&[b"PTTL".as_slice(), &key]),
        ]);
        self.push_entry(source, seq, db, 2, Payload::Cmd { frame: frame.clone(), replies: 2 }, false);
        self.push_entry(target, seq, db, 2, Payload::Pending, false);
        if let Some(e) = self.streams[target].log.back_mut() {
            if e.seq == seq {
                e.copy = true;
            }
        }
        if let Some(r) = self.streams[target].resync.as_mut() {
            r.outstanding += 1;
        }
        self.effects.insert(
            seq,
            Effect { source, kind: EffectKind::Copy { key, target }, source_frame: frame, source_replies: 2 },
        );
        true
    }

    /// The shell's scan of every key finished: `t` is in sync once everything up to now is
    /// applied there.
    pub fn scan_done(&mut self, t: usize) {
        let at = self.next_seq - 1;
        if let Some(r) = self.streams[t].resync.as_mut() {
            r.scan_done_at = Some(at);
        }
        self.check_progress(t);
    }

    /// After a partition: `target` (the other side's Redis) comes back; `theirs` are the keys
    /// its writer wrote while cut off (None: unknown). Keys only they wrote are copied here,
    /// keys we wrote (conflicts included: we have the higher priority) are copied there.
    pub fn start_merge(&mut self, target: usize, theirs: Option<Vec<(u32, Bytes)>>) {
        let Some(local) = self.primary().filter(|&p| p != target) else {
            self.streams[target].pending_merge = Some(theirs);
            return;
        };
        let st = &mut self.streams[target];
        st.enabled = true;
        if !st.connected {
            st.pending_merge = Some(theirs);
            st.state = ReplicaState::Down;
            return;
        }
        // A rebuild was due anyway (its Redis restarted, or this writer cannot prove what
        // it holds): after their keys are copied over, it is rebuilt from us entirely.
        let ours_all = st.missed_all || st.needs_resync || theirs.is_none();
        let ours: HashSet<(u32, Bytes)> = std::mem::take(&mut st.missed);
        st.clear_log();
        st.needs_resync = false;
        st.state = ReplicaState::Resyncing;
        st.resync = Some(Resync::default());
        st.resyncs += 1;
        st.missed_all = false;
        let mut merged = 0u64;
        let mut conflicts = 0u64;
        match &theirs {
            Some(keys) => {
                for (db, key) in keys {
                    if ours.contains(&(*db, key.clone())) {
                        conflicts += 1;
                        continue;
                    }
                    // Their write: copy it into our Redis (the copy lands in `local`'s stream).
                    let seq = self.alloc();
                    let frame = frames_of(&[
                        Request::from_args(&[b"DUMP".as_slice(), key]),
                        Request::from_args(&[b"PTTL".as_slice(), key]),
                    ]);
                    self.push_entry(target, seq, *db, 2, Payload::Cmd { frame: frame.clone(), replies: 2 }, false);
                    self.push_entry(local, seq, *db, 2, Payload::Pending, false);
                    self.effects.insert(
                        seq,
                        Effect {
                            source: target,
                            kind: EffectKind::Copy { key: key.clone(), target: local },
                            source_frame: frame,
                            source_replies: 2,
                        },
                    );
                    merged += 1;
                }
            }
            None => {
                self.counters.lost_partition_writes = true;
                warn!(replica = %self.streams[target].node, "the other side's partition writes are unknown: they are overwritten by the full resync");
            }
        }
        self.counters.merged_keys += merged;
        self.counters.conflict_keys += conflicts;
        info!(replica = %self.streams[target].node, merged, conflicts, ours = ours.len(), "merging after a partition");
        if ours_all {
            // We lost track of what we wrote: rebuild them from us entirely (after their keys
            // were copied over, which comes first in their stream).
            let seq = self.alloc();
            let flush = Request::from_args(&[b"FLUSHALL"]);
            self.push_entry(target, seq, 0, 2, Payload::Cmd { frame: flush.frame, replies: 1 }, false);
            if merged > 0 {
                if let Some(r) = self.streams[target].resync.as_mut() {
                    r.scan_after = Some(seq);
                }
                self.start_deferred_scans();
            } else {
                self.scans.push(target);
            }
        } else {
            for (db, key) in ours {
                self.copy_key(db, key, local, target);
            }
            self.scan_done(target);
        }
    }

    /// Keys written while stream `s` could not receive them (None: too many / unknown).
    pub fn missed_keys(&self, s: usize) -> Option<Vec<(u32, Bytes)>> {
        let st = &self.streams[s];
        (!st.missed_all).then(|| st.missed.iter().cloned().collect())
    }

    /// Writes behind on stream `s`.
    pub fn lag(&self, s: usize) -> u64 {
        self.last_seq().saturating_sub(self.acked_upto(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq2(ack_all: bool) -> Sequencer {
        let mut s =
            Sequencer::new(&[("a".into(), "ra".into(), false), ("b".into(), "rb".into(), false)], ack_all, 1 << 20);
        s.on_up(0, "A");
        s.on_up(1, "B");
        s
    }

    fn o(t: u64) -> Origin {
        Origin { ticket: t, client_key: t, db: 0, proto: 2 }
    }

    /// One command (`write` as the client's core classified it), as `submit` takes it.
    fn req(a: &[&str]) -> Vec<Request> {
        vec![Request::from_args(a)]
    }

    fn submit(s: &mut Sequencer, o: Origin, reqs: Vec<Request>, write: bool, now_ms: u64) {
        let work = match WriterRequest::from_frames(reqs, false) {
            Some(WriterRequest::One { req, .. }) => WriterRequest::One { req, write },
            Some(block) => block,
            None => panic!("not a request"),
        };
        s.submit(o, work, now_ms);
    }

    fn text(b: &VecDeque<Bytes>) -> String {
        let joined: Vec<u8> = b.iter().flat_map(|c| c.iter().copied()).collect();
        String::from_utf8_lossy(&joined).replace("\r\n", " ")
    }

    #[test]
    fn writes_reach_both_and_ack_all_waits_for_both() {
        let mut s = seq2(true);
        assert_eq!(s.streams[0].state, ReplicaState::InSync);
        assert_eq!(s.streams[1].state, ReplicaState::InSync);
        submit(&mut s, o(1), req(&["SET", "k", "v"]), true, 0);
        let a = s.take_batch(0).unwrap();
        let b = s.take_batch(1).unwrap();
        assert!(text(&a).ends_with("SET $1 k $1 v "), "{}", text(&a));
        assert_eq!(text(&a), text(&b));
        // SELECT 0 reply then the SET reply.
        s.on_reply(0, resp::simple("OK"), 0).unwrap();
        s.on_reply(0, resp::simple("OK"), 0).unwrap();
        assert!(s.take_replies().is_empty(), "ack=all waits for b");
        s.on_reply(1, resp::simple("OK"), 0).unwrap();
        s.on_reply(1, resp::simple("OK"), 0).unwrap();
        assert_eq!(s.take_replies().len(), 1);
    }

    #[test]
    fn down_replica_backlogs_and_replays_in_order() {
        let mut s = seq2(true);
        s.on_down(1, "test");
        submit(&mut s, o(1), req(&["INCR", "n"]), true, 0);
        submit(&mut s, o(2), req(&["INCR", "n"]), true, 0);
        assert!(s.take_batch(1).is_none());
        let _ = s.take_batch(0).unwrap();
        for r in [resp::simple("OK"), resp::int(1), resp::int(2)] {
            s.on_reply(0, r, 0).unwrap();
        }
        assert_eq!(s.take_replies().len(), 2, "a down replica is not waited for");
        assert_eq!(s.streams[1].backlog_entries(), 2);
        s.on_up(1, "B");
        assert_eq!(s.streams[1].state, ReplicaState::CatchingUp);
        let b = s.take_batch(1).unwrap();
        assert_eq!(text(&b).matches("INCR").count(), 2);
        for r in [resp::simple("OK"), resp::int(1), resp::int(2)] {
            s.on_reply(1, r, 0).unwrap();
        }
        assert_eq!(s.streams[1].state, ReplicaState::InSync);
    }

    #[test]
    fn spop_ships_srem_of_what_was_popped() {
        let mut s = seq2(false);
        submit(&mut s, o(1), req(&["SPOP", "s"]), true, 0);
        assert!(s.take_batch(1).is_none(), "b waits for a's answer");
        let a = s.take_batch(0).unwrap();
        assert!(text(&a).contains("SPOP"));
        s.on_reply(0, resp::simple("OK"), 0).unwrap();
        s.on_reply(0, resp::bulk(b"m3"), 0).unwrap();
        assert_eq!(&s.take_replies()[0].1[..], b"$2\r\nm3\r\n");
        let b = s.take_batch(1).unwrap();
        assert!(text(&b).contains("SREM $1 s $2 m3"), "{}", text(&b));
    }

    #[test]
    fn restarted_redis_is_rebuilt_with_copies_in_stream_order() {
        let mut s = seq2(false);
        s.on_down(1, "killed");
        s.on_up(1, "B2");
        assert_eq!(s.streams[1].state, ReplicaState::Resyncing);
        assert_eq!(s.take_scans(), vec![1]);
        assert!(s.copy_key(0, Bytes::from_static(b"k"), 0, 1));
        submit(&mut s, o(1), req(&["SET", "k", "new"]), true, 0);
        let b = s.take_batch(1).unwrap();
        assert!(
            text(&b).contains("FLUSHALL") && !text(&b).contains("SET"),
            "the copy blocks later writes: {}",
            text(&b)
        );
        let a = s.take_batch(0).unwrap();
        assert!(text(&a).contains("DUMP") && text(&a).contains("SET"));
        for r in [resp::simple("OK"), resp::bulk(b"payload"), resp::int(-1), resp::simple("OK")] {
            s.on_reply(0, r, 0).unwrap();
        }
        let b = s.take_batch(1).unwrap();
        let t = text(&b);
        assert!(t.find("RESTORE").unwrap() < t.find("SET").unwrap(), "{t}");
        s.scan_done(1);
        for r in [resp::simple("OK"), resp::simple("OK"), resp::simple("OK")] {
            s.on_reply(1, r, 0).unwrap();
        }
        assert_eq!(s.streams[1].state, ReplicaState::Resyncing);
        s.on_reply(1, resp::simple("OK"), 0).unwrap();
        assert_eq!(s.streams[1].state, ReplicaState::InSync);
    }

    #[test]
    fn watch_aborts_exec_after_a_write_to_the_key() {
        let mut s = seq2(false);
        submit(&mut s, o(1), req(&["WATCH", "k"]), false, 0);
        submit(&mut s, o(2), req(&["SET", "k", "x"]), true, 0);
        let block = WriterRequest::Block { queued: vec![Request::from_args(&["SET", "k", "y"])], watched: true };
        s.submit(o(1), block, 0);
        let r = s.take_replies();
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(&r[1].1[..], b"*-1\r\n");
        // Without a record of the WATCH (another writer took it), a watched EXEC aborts too.
        let block = WriterRequest::Block { queued: vec![Request::from_args(&["SET", "k", "z"])], watched: true };
        s.submit(o(3), block, 0);
        assert_eq!(&s.take_replies()[0].1[..], b"*-1\r\n");
    }

    #[test]
    fn an_spop_that_pops_nothing_does_not_hold_up_the_other_stream() {
        let mut s = seq2(true);
        submit(&mut s, o(1), req(&["SPOP", "nokey"]), true, 0);
        submit(&mut s, o(2), req(&["SET", "k", "v"]), true, 0);
        let _ = s.take_batch(0);
        for r in [resp::simple("OK"), resp::null(2), resp::simple("OK")] {
            s.on_reply(0, r, 0).unwrap();
        }
        let b = text(&s.take_batch(1).unwrap());
        assert!(!b.contains("SREM") && b.contains("SET"), "{b}");
        s.on_reply(1, resp::simple("OK"), 0).unwrap();
        s.on_reply(1, resp::simple("OK"), 0).unwrap();
        assert_eq!(s.take_replies().len(), 2, "both answered, nothing stuck");
        assert_eq!(s.lag(1), 0);
    }

    #[test]
    fn a_push_sequenced_while_a_pop_is_in_flight_wakes_it() {
        let mut s = seq2(false);
        submit(&mut s, o(1), req(&["BLPOP", "l", "0"]), true, 0);
        submit(&mut s, o(2), req(&["RPUSH", "l", "x"]), true, 0);
        let _ = s.take_batch(0);
        // The pop ran before the push: nothing to pop; it must be tried again, not parked.
        for r in [
            resp::simple("OK"),
            resp::simple("OK"),
            resp::simple("QUEUED"),
            Bytes::from_static(b"*1\r\n*-1\r\n"),
            resp::int(1),
        ] {
            s.on_reply(0, r, 0).unwrap();
        }
        let again = text(&s.take_batch(0).unwrap());
        assert!(again.contains("BLPOP"), "{again}");
    }

    #[test]
    fn requests_with_wrong_arity_are_refused_before_use() {
        let mut s = seq2(false);
        submit(&mut s, o(1), req(&["BLMPOP"]), true, 0);
        submit(&mut s, o(2), req(&["EXPIRE", "k"]), true, 0);
        let r = s.take_replies();
        assert_eq!(r.len(), 2);
        assert!(r.iter().all(|(_, e)| e.starts_with(b"-ERR wrong number of arguments")), "{r:?}");
    }

    #[test]
    fn blocking_pop_parks_and_wakes_on_a_push() {
        let mut s = seq2(false);
        submit(&mut s, o(1), req(&["BLPOP", "l", "0"]), true, 0);
        let _ = s.take_batch(0);
        for r in [resp::simple("OK"), resp::simple("OK"), resp::simple("QUEUED"), Bytes::from_static(b"*1\r\n*-1\r\n")]
        {
            s.on_reply(0, r, 0).unwrap();
        }
        assert!(s.take_replies().is_empty(), "parked");
        submit(&mut s, o(2), req(&["RPUSH", "l", "x"]), true, 0);
        let a = text(&s.take_batch(0).unwrap());
        assert!(a.find("RPUSH").unwrap() < a.rfind("BLPOP").unwrap(), "{a}");
    }
}

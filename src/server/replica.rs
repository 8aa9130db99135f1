//! The replication shell on core 0 of a node with peers: runs `Membership` (who writes) and,
//! while this node is the writer, the `Sequencer` with one ordered connection per replica
//! Redis, the key scans of full resyncs, the peer link (`peer`) and the
//! status text. Requests on the writer path arrive here from every core (`Lane::Writer`);
//! a follower forwards them to the writer over the peer link.
//!
//! No replication decision is made here: roles, where a request goes (hold / forward /
//! sequence), the reference copy on a role change, replica-stream freshness and rebuilds, and
//! local-read gating are `replication::mirror`'s; ordering and acks are the `Sequencer`'s.
//! This module connects, reads, writes, keeps time and hands results back.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use monoio::io::AsyncWriteRentExt;
use monoio::net::{ListenerOpts, TcpListener};
use tracing::{info, warn};

use super::conn::{Conn, ConnReader, ConnWriter};
use super::io::read_more;
use super::peer::{self, LinkWait, PeerConn, PeerHandler, PeerLink};
use super::sink::{deliver_to, Held, Sink};
use super::upstream::{connect_redis, roundtrip};
use super::{Core, Signal};
use crate::config::WriteAck;
use crate::replication::membership::{Decision, Report, Role};
use crate::replication::mirror::{ForwardedPath, MirrorControl, WriterPath};
use crate::replication::sequencer::{Origin, ReplicaState, Sequencer};
use crate::replication::writer_request::WriterRequest;
use crate::resp::{self, ReplySkimmer};

/// Key copies in flight per resync (the throttle that keeps the writer serving).
const COPIES_IN_FLIGHT: usize = 256;

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A coarse clock (the kernel's tick, a few ms): read on every write on the writer path,
/// where a precise `clock_gettime` showed up in profiles. `CLOCK_REALTIME_COARSE` for the
/// absolute expiry times shipped to replicas, `CLOCK_MONOTONIC_COARSE` for timeouts.
fn coarse_ms(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into memory we own; the clock ids used are
    // valid on Linux, and a failure leaves the zeroed value.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

impl PeerHandler for Repl {
    fn node_id(&self) -> &str {
        Repl::node_id(self)
    }
    fn secret(&self) -> &str {
        Repl::secret(self)
    }
    fn heartbeat_ms(&self) -> u64 {
        Repl::heartbeat_ms(self)
    }
    fn tls(&self) -> (Option<&crate::tls::ServerTls>, Option<&crate::tls::ClientTls>) {
        let t = &self.core.shared.tls;
        (t.peer_accept.as_deref(), t.peer_connect.as_deref())
    }
    fn heard(&self, report: &str) {
        Repl::heard(self, report)
    }
    fn report_text(&self) -> String {
        Repl::report_text(self)
    }
    fn submit_forwarded(&self, h: Held) {
        Repl::submit_forwarded(self, h)
    }
    fn handover_requested(this: &Rc<Self>, conn: Rc<PeerConn>, tag: u64) {
        Repl::handover_requested(this, conn, tag)
    }
    fn client_key_gone(&self, key: u64) {
        Repl::client_key_gone(self, key)
    }
    fn yield_received(&self, from: &str, epoch: u64, keys: Option<Vec<(u32, Bytes)>>) -> Bytes {
        Repl::yield_received(self, from, epoch, keys)
    }
    fn link_reply(&self, link: &PeerLink, wait: LinkWait, reply: Bytes) {
        Repl::link_reply(self, link, wait, reply)
    }
    fn link_failed(&self, link: &PeerLink, wait: LinkWait) {
        Repl::link_failed(self, link, wait)
    }
}

/// Core 0's replication state.
pub(crate) struct Repl {
    core: Rc<Core>,
    started_ms: u64,
    /// Every decision (roles, routing, reference copy, stream freshness, local reads).
    ctl: RefCell<MirrorControl>,
    seq: RefCell<Option<Sequencer>>,
    /// Bumped whenever the sequencer is created or dropped; stream tasks of an older
    /// generation end.
    gen: Cell<u64>,
    tickets: RefCell<crate::slot::IdMap<u64, Sink>>,
    next_ticket: Cell<u64>,
    pending: RefCell<VecDeque<Held>>,
    links: Vec<Rc<PeerLink>>,
    stream_wakes: RefCell<Vec<Rc<Signal>>>,
    /// The status text last published (the shared copy is only locked when it changes).
    last_status: RefCell<String>,
    /// Send a heartbeat now (our role changed: peers should know at once).
    hb_now: Signal,
    /// When `sequence` last checked the peers' leases.
    lease_checked_at: Cell<u64>,
}

impl Repl {
    /// Bind the peer port and start the tasks. Core 0 only.
    pub fn start(core: &Rc<Core>) -> std::io::Result<Rc<Repl>> {
        let cfg = &core.shared.cfg;
        let peer_listener =
            TcpListener::bind_with_config(cfg.node.peer_listen, &ListenerOpts::new().reuse_addr(true).backlog(128))?;
        let boot = (unix_ms() << 16) ^ std::process::id() as u64;
        let peers: Vec<(String, u32)> = cfg.peers.iter().map(|p| (p.id.clone(), p.priority.unwrap_or(0))).collect();
        let ctl =
            MirrorControl::new(&cfg.node.id, cfg.node.priority, boot, &peers, cfg.replication.failover_timeout_ms);
        let repl = Rc::new(Repl {
            core: core.clone(),
            started_ms: coarse_ms(libc::CLOCK_MONOTONIC_COARSE),
            ctl: RefCell::new(ctl),
            seq: RefCell::new(None),
            gen: Cell::new(0),
            tickets: RefCell::new(Default::default()),
            next_ticket: Cell::new(1),
            pending: RefCell::new(VecDeque::new()),
            links: cfg.peers.iter().map(|p| PeerLink::new(&p.id, &p.address)).collect(),
            stream_wakes: RefCell::new(Vec::new()),
            last_status: RefCell::new(String::new()),
            hb_now: Signal::default(),
            lease_checked_at: Cell::new(0),
        });
        monoio::spawn(peer::serve(repl.clone(), peer_listener));
        for l in &repl.links {
            monoio::spawn(peer::run_link(repl.clone(), l.clone()));
        }
        monoio::spawn(heartbeats(repl.clone()));
        monoio::spawn(decide_loop(repl.clone()));
        info!(node = %cfg.node.id, priority = cfg.node.priority, peer_listen = %cfg.node.peer_listen, peers = cfg.peers.len(), "pair mode: waiting to hear from peers");
        Ok(repl)
    }

    /// Milliseconds since start (monotonic, coarse).
    fn now(&self) -> u64 {
        coarse_ms(libc::CLOCK_MONOTONIC_COARSE).saturating_sub(self.started_ms) + 1
    }

    pub fn heartbeat_ms(&self) -> u64 {
        (self.core.shared.cfg.replication.failover_timeout_ms / 5).clamp(20, 1000)
    }

    pub fn secret(&self) -> &str {
        &self.core.shared.cfg.replication.secret
    }

    pub fn node_id(&self) -> &str {
        &self.core.shared.cfg.node.id
    }

    // ---- the writer path -------------------------------------------------------------

    /// A request from one of this node's clients.
    pub fn submit_client(&self, sink: Sink, client_id: u64, db: u32, proto: u8, work: WriterRequest) {
        let key = peer::client_key(self.node_id(), client_id);
        self.route(Held { sink, client_key: key, db, proto, work, deadline_ms: 0 });
    }

    /// A request a follower forwarded: only a writer takes it.
    /// Sequenced at once (not behind this node's own held requests: after a handover those
    /// may be waiting for exactly these, our clients' requests coming back from the old
    /// writer).
    pub fn submit_forwarded(&self, h: Held) {
        let path = self.ctl.borrow().route_forwarded();
        match path {
            ForwardedPath::Sequence => self.sequence(h),
            ForwardedPath::Hold => self.hold(h),
            ForwardedPath::NotWriter => {
                if let Sink::To(target, tag) = &h.sink {
                    target.not_writer(*tag);
                }
            }
        }
    }

    /// Requests leave core 0 in arrival order: once one has to wait, later ones wait behind
    /// it (a client's pipeline must not overtake itself).
    fn route(&self, h: Held) {
        if !self.pending.borrow().is_empty() {
            return self.hold(h);
        }
        if let Err(h) = self.try_route(h) {
            self.hold(h);
        }
    }

    fn try_route(&self, h: Held) -> Result<(), Held> {
        let forwards_in_flight = self.links.iter().any(|l| l.forwards_in_flight());
        let path = self.ctl.borrow().route(forwards_in_flight);
        match path {
            WriterPath::Sequence => {
                self.sequence(h);
                Ok(())
            }
            WriterPath::Forward(writer) => match self.links.iter().find(|l| l.node == writer) {
                Some(link) => {
                    let id = h.client_key;
                    link.forward(h, id)
                }
                None => Err(h),
            },
            WriterPath::Hold => Err(h),
        }
    }

    fn hold(&self, mut h: Held) {
        if h.deadline_ms == 0 {
            h.deadline_ms = self.now() + self.core.shared.cfg.redis.request_timeout_ms;
        }
        self.pending.borrow_mut().push_back(h);
    }

    /// Start following `writer`: reads stop using the local Redis until the writer says it
    /// is in sync.
    fn follow(&self, writer: &str) {
        let now = self.now();
        self.ctl.borrow_mut().follow(writer, now);
        self.core.shared.local_in_sync.store(false, Ordering::Relaxed);
    }

    fn sequence(&self, h: Held) {
        // Lease: a writer that was paused (SIGSTOP, a long stall) must notice peers it has
        // not heard from before writing their Redis again. Once per clock tick (a few ms),
        // not per write: a pause always moves the coarse clock.
        let now = self.now();
        if self.lease_checked_at.replace(now) != now {
            self.update_streams(now);
        }
        let ticket = self.next_ticket.get();
        self.next_ticket.set(ticket + 1);
        self.tickets.borrow_mut().insert(ticket, h.sink);
        let o = Origin { ticket, client_key: h.client_key, db: h.db, proto: h.proto };
        if let Some(seq) = self.seq.borrow_mut().as_mut() {
            seq.submit(o, h.work, coarse_ms(libc::CLOCK_REALTIME_COARSE));
        }
        self.after_seq();
    }

    /// Hand out replies, wake stream writers, start scans.
    fn after_seq(self: &Repl) {
        let (replies, scans) = match self.seq.borrow_mut().as_mut() {
            Some(s) => (s.take_replies(), s.take_scans()),
            None => return,
        };
        for (ticket, reply) in replies {
            let sink = self.tickets.borrow_mut().remove(&ticket);
            if let Some(sink) = sink {
                deliver_to(&self.core, sink, reply);
            }
        }
        for w in self.stream_wakes.borrow().iter() {
            w.notify();
        }
        if !scans.is_empty() {
            if let Some(me) = self.core.repl.borrow().clone() {
                for t in scans {
                    monoio::spawn(scan_task(me.clone(), t, self.gen.get()));
                }
            }
        }
    }

    fn route_pending(&self) {
        let now = self.now();
        let held: Vec<Held> = self.pending.borrow_mut().drain(..).collect();
        let mut blocked = false;
        for h in held {
            if h.deadline_ms != 0 && now > h.deadline_ms {
                deliver_to(
                    &self.core,
                    h.sink,
                    resp::error("TRYAGAIN resplica: no writer is reachable (failover in progress?)"),
                );
                continue;
            }
            if blocked {
                self.pending.borrow_mut().push_back(h);
                continue;
            }
            if let Err(h) = self.try_route(h) {
                blocked = true;
                self.pending.borrow_mut().push_back(h);
            }
        }
    }

    // ---- peer link callbacks ------------------------------------------------------------

    pub fn heard(&self, text: &str) {
        if let Some(r) = Report::decode(text) {
            let now = self.now();
            self.ctl.borrow_mut().heard(r, now);
        }
    }

    pub fn report(&self) -> Report {
        let ctl = self.ctl.borrow();
        let m = &ctl.members;
        let replicas = match self.seq.borrow().as_ref() {
            Some(s) => {
                s.streams.iter().map(|st| (st.node.clone(), st.state, st.run_id.clone().unwrap_or_default())).collect()
            }
            None => Vec::new(),
        };
        Report {
            id: m.id.clone(),
            boot: m.boot,
            priority: m.priority,
            role: Some(m.role),
            epoch: m.epoch,
            writer: m.writer.clone().unwrap_or_default(),
            replicas,
        }
    }

    pub fn report_text(&self) -> String {
        self.report().encode()
    }

    pub fn link_reply(&self, link: &PeerLink, wait: LinkWait, reply: Bytes) {
        match wait {
            LinkWait::Heartbeat => {
                if let Some(text) = crate::replication::reply::bulk(&reply) {
                    self.heard(&String::from_utf8_lossy(text));
                }
            }
            LinkWait::Forward(h) => {
                if reply == peer::NOT_WRITER {
                    // The writer moved while this was on its way: route it again.
                    self.hold(h);
                } else {
                    deliver_to(&self.core, h.sink, reply);
                }
            }
            LinkWait::Handover => {
                if let Some(epoch) = crate::replication::reply::int(&reply) {
                    info!(from = %link.node, epoch, "writer role handed over to this node");
                    self.become_writer(epoch as u64 + 1, true);
                } else {
                    warn!(from = %link.node, reply = %String::from_utf8_lossy(&reply).trim_end(), "handover refused");
                }
            }
            LinkWait::Yield => {
                let ok = !resp::is_error(&reply);
                self.finish_yield(&link.node, ok);
            }
            LinkWait::Ignore => {}
        }
    }

    /// One of this node's clients disconnected.
    pub fn client_gone(&self, client_id: u64) {
        let key = peer::client_key(self.node_id(), client_id);
        if self.ctl.borrow().role() == Role::Writer {
            self.client_key_gone(key);
        } else {
            let writer = self.ctl.borrow().members.writer.clone();
            if let Some(link) = writer.as_deref().and_then(|w| self.links.iter().find(|l| l.node == w)) {
                let id = key.to_string();
                link.send(b"RS.GONE", &[id.as_bytes()], LinkWait::Ignore);
            }
        }
    }

    pub fn client_key_gone(&self, key: u64) {
        let tickets = self.seq.borrow_mut().as_mut().map(|s| s.client_gone(key)).unwrap_or_default();
        for t in tickets {
            let sink = self.tickets.borrow_mut().remove(&t);
            if let Some(sink) = sink {
                // Completes the client's (or the forwarder's) slot so it can close.
                deliver_to(&self.core, sink, resp::error("ERR resplica: client disconnected"));
            }
        }
    }

    pub fn link_failed(&self, link: &PeerLink, wait: LinkWait) {
        match wait {
            LinkWait::Forward(h) => deliver_to(
                &self.core,
                h.sink,
                resp::error(&format!(
                    "ERR resplica: the link to the writer ({}) failed; the command may or may not have been applied",
                    link.node
                )),
            ),
            LinkWait::Yield => self.finish_yield(&link.node, false),
            _ => {}
        }
    }

    // ---- role changes -------------------------------------------------------------------

    fn peer_index(&self, node: &str) -> Option<usize> {
        self.core.shared.cfg.peers.iter().position(|p| p.id == node)
    }

    fn become_writer(&self, epoch: u64, handover: bool) {
        let cfg = &self.core.shared.cfg;
        let now = self.now();
        let local_in_sync = self.core.shared.local_in_sync.load(Ordering::Relaxed);
        let plan = self.ctl.borrow_mut().become_writer(epoch, handover, local_in_sync, now);
        if !plan.local_trusted {
            warn!("taking the writer role with a local Redis that was not in sync: it will be rebuilt from a peer's");
        }
        let addrs: Vec<String> =
            std::iter::once(cfg.redis.address.to_string()).chain(cfg.peers.iter().map(|p| p.redis.clone())).collect();
        let ids = std::iter::once(cfg.node.id.clone()).chain(cfg.peers.iter().map(|p| p.id.clone()));
        let replicas: Vec<(String, String, bool)> =
            ids.zip(addrs).zip(&plan.rebuild).map(|((id, addr), rebuild)| (id, addr, *rebuild)).collect();
        let mut seq = Sequencer::new(
            &replicas,
            cfg.replication.write_ack == WriteAck::All,
            cfg.replication.backlog_bytes.0 as usize,
        );
        for (s, on) in plan.enabled.iter().enumerate().skip(1) {
            if !on {
                seq.set_enabled(s, false, false);
            }
        }
        *self.seq.borrow_mut() = Some(seq);
        self.gen.set(self.gen.get() + 1);
        if plan.fail_forwards {
            for l in &self.links {
                l.fail_forwards(self);
            }
        }
        let epoch = self.ctl.borrow().members.epoch;
        info!(epoch, handover, "this node is now the writer");
        self.hb_now.notify();
        let gen = self.gen.get();
        let mut wakes = Vec::new();
        for (i, (_, addr, _)) in replicas.iter().enumerate() {
            let wake = Rc::new(Signal::default());
            wakes.push(wake.clone());
            if let Some(me) = self.core.repl.borrow().clone() {
                monoio::spawn(stream_task(me, i, gen, addr.clone(), wake));
            }
        }
        *self.stream_wakes.borrow_mut() = wakes;
        self.route_pending();
    }

    /// Drop the sequencer (after a handover or a yield); blocked clients go to the new writer.
    fn stop_writer(&self) {
        self.hb_now.notify();
        let parked = self.seq.borrow_mut().as_mut().map(|s| s.take_parked()).unwrap_or_default();
        *self.seq.borrow_mut() = None;
        self.gen.set(self.gen.get() + 1);
        for w in self.stream_wakes.borrow_mut().drain(..) {
            w.notify();
        }
        for (ticket, client_key, db, proto, work) in parked {
            if let Some(sink) = self.tickets.borrow_mut().remove(&ticket) {
                self.hold(Held { sink, client_key, db, proto, work, deadline_ms: 0 });
            }
        }
        // Anything else still waiting on a ticket cannot be answered any more.
        let left: Vec<Sink> = self.tickets.borrow_mut().drain().map(|(_, s)| s).collect();
        for s in left {
            deliver_to(&self.core, s, resp::error("ERR resplica: the writer role moved before this was answered"));
        }
    }

    pub fn handover_requested(self: &Rc<Self>, conn: Rc<PeerConn>, tag: u64) {
        if self.ctl.borrow().role() != Role::Writer || self.ctl.borrow().is_draining() {
            conn.reply(tag, &resp::error("ERR resplica: not the writer (or busy)"));
            return;
        }
        let to = conn.node.borrow().clone();
        info!(to = %to, "handing the writer role over: draining");
        self.ctl.borrow_mut().set_draining(true);
        let me = self.clone();
        monoio::spawn(async move {
            let idle = me.wait_idle(Duration::from_secs(5)).await;
            let all_in_sync = me.seq.borrow().as_ref().is_some_and(|s| s.all_in_sync());
            if idle && all_in_sync {
                let epoch = me.ctl.borrow().members.epoch;
                me.stop_writer();
                me.follow(&to);
                conn.reply(tag, &resp::int(epoch as i64));
                info!(to = %to, epoch, "writer role handed over");
            } else {
                conn.reply(tag, &resp::error("ERR resplica: could not drain in time, or a replica is not in sync"));
            }
            me.ctl.borrow_mut().set_draining(false);
            me.route_pending();
        });
    }

    async fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.seq.borrow().as_ref().is_none_or(|s| s.is_idle()) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            monoio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn start_yield(self: &Rc<Self>, to: String) {
        let Some(pi) = self.peer_index(&to) else { return };
        info!(to = %to, "another writer with a higher priority is back: yielding");
        self.ctl.borrow_mut().set_draining(true);
        let me = self.clone();
        monoio::spawn(async move {
            if !me.wait_idle(Duration::from_secs(5)).await {
                me.finish_yield(&to, false);
                return;
            }
            let epoch = me.ctl.borrow().members.epoch.to_string();
            let keys = me.seq.borrow().as_ref().and_then(|s| s.missed_keys(pi + 1));
            let mut owned: Vec<Vec<u8>> = Vec::new();
            match &keys {
                Some(ks) => {
                    for (db, k) in ks {
                        owned.push(db.to_string().into_bytes());
                        owned.push(k.to_vec());
                    }
                }
                None => owned.push(b"unknown".to_vec()),
            }
            let mut args: Vec<&[u8]> = vec![epoch.as_bytes()];
            args.extend(owned.iter().map(|v| v.as_slice()));
            let sent = me.links[pi].send(b"RS.YIELD", &args, LinkWait::Yield);
            if !sent {
                me.finish_yield(&to, false);
            }
        });
    }

    fn finish_yield(&self, to: &str, ok: bool) {
        if ok {
            self.stop_writer();
            self.follow(to);
            info!(to = %to, "yielded the writer role; partition writes sent for merging");
        } else {
            warn!(to = %to, "yield failed; still the writer");
        }
        self.ctl.borrow_mut().set_draining(false);
        self.route_pending();
    }

    /// The loser of a partition yields to us with the keys it wrote.
    pub fn yield_received(&self, from: &str, epoch: u64, keys: Option<Vec<(u32, Bytes)>>) -> Bytes {
        if self.ctl.borrow().role() != Role::Writer {
            return resp::error("ERR resplica: not the writer");
        }
        let Some(stream) = self.ctl.borrow_mut().yield_received(from, epoch) else {
            return resp::error("ERR resplica: unknown node");
        };
        let n = keys.as_ref().map(|k| k.len());
        if let Some(s) = self.seq.borrow_mut().as_mut() {
            s.start_merge(stream, keys);
        }
        info!(from = %from, their_keys = ?n, "partition healed: merging");
        self.after_seq();
        resp::simple("OK")
    }

    // ---- periodic work --------------------------------------------------------------------

    fn tick(self: &Rc<Self>) {
        let now = self.now();
        let decision = self.ctl.borrow_mut().tick(now);
        if decision.is_some() {
            self.hb_now.notify();
        }
        match decision {
            Some(Decision::BecomeWriter { epoch, handover }) => self.become_writer(epoch, handover),
            Some(Decision::Follow { writer }) => {
                if self.ctl.borrow().role() == Role::Writer {
                    self.stop_writer();
                }
                info!(writer = %writer, "following");
                self.follow(&writer);
            }
            Some(Decision::AskHandover { peer }) => {
                if let Some(l) = self.links.iter().find(|l| l.node == peer) {
                    info!(writer = %peer, "asking the writer to hand the role over");
                    l.send(b"RS.HANDOVER", &[], LinkWait::Handover);
                }
            }
            Some(Decision::Yield { to }) => self.start_yield(to),
            None => {}
        }
        self.update_streams(now);
        if let Some(s) = self.seq.borrow_mut().as_mut() {
            s.tick(unix_ms());
        }
        self.after_seq();
        self.route_pending();
        self.publish_status(now);
    }

    /// Apply the control plane's stream changes (peer freshness, rebuilds).
    fn update_streams(&self, now: u64) {
        let mut seq = self.seq.borrow_mut();
        let Some(seq) = seq.as_mut() else { return };
        let enabled: Vec<bool> = seq.streams.iter().map(|st| st.is_enabled()).collect();
        let changes = self.ctl.borrow_mut().stream_changes(now, &enabled);
        for c in changes {
            if c.rebuild {
                info!(peer = %seq.streams[c.stream].node, "peer sidecar (re)started: its Redis will be rebuilt");
            }
            seq.set_enabled(c.stream, c.enable, c.rebuild);
        }
    }

    fn publish_status(&self, now: u64) {
        let cfg = &self.core.shared.cfg;
        let mine =
            if self.core.lanes[0].is_connected() { self.core.redis_run_id.borrow().clone() } else { String::new() };
        let own_in_sync = self.seq.borrow().as_ref().map(|s| s.streams[0].state == ReplicaState::InSync);
        let in_sync = self.ctl.borrow_mut().local_reads(now, &mine, own_in_sync);
        let ctl = self.ctl.borrow();
        let m = &ctl.members;
        let seq = self.seq.borrow();
        self.core.shared.local_in_sync.store(in_sync, Ordering::Relaxed);
        let mut t = format!(
            "node:{}\nrole:{}\nepoch:{}\nwriter:{}\npriority:{}\nlocal_in_sync:{}\n",
            m.id,
            m.role.name(),
            m.epoch,
            m.writer.clone().unwrap_or_default(),
            m.priority,
            in_sync as u8
        );
        for p in &m.peers {
            t.push_str(&format!(
                "peer:{} link={} priority={} role={} epoch={}\n",
                p.id,
                if m.is_live(p, now) { "up" } else { "down" },
                p.report.priority,
                p.report.role.map(|r| r.name()).unwrap_or("unknown"),
                p.report.epoch
            ));
        }
        match seq.as_ref() {
            Some(s) => {
                for (i, st) in s.streams.iter().enumerate() {
                    t.push_str(&format!(
                        "replica:{} redis={} state={} backlog_bytes={} backlog_entries={} lag={} resyncs={} errors={}\n",
                        st.node,
                        st.addr,
                        st.state.name(),
                        st.backlog_bytes(),
                        st.backlog_entries(),
                        s.lag(i),
                        st.resyncs,
                        st.errors
                    ));
                }
                t.push_str(&format!(
                    "merged_keys:{}\nconflict_keys:{}\npartition_writes_lost:{}\n",
                    s.counters.merged_keys, s.counters.conflict_keys, s.counters.lost_partition_writes as u8
                ));
            }
            None => {
                let w = m.writer.as_deref().and_then(|w| m.peer(w)).filter(|w| m.is_live(w, now));
                if let Some(w) = w {
                    for (n, st, _) in &w.report.replicas {
                        let addr = if n == &cfg.node.id {
                            cfg.redis.address.to_string()
                        } else {
                            cfg.peers.iter().find(|p| &p.id == n).map(|p| p.redis.clone()).unwrap_or_default()
                        };
                        t.push_str(&format!("replica:{n} redis={addr} state={} reported_by={}\n", st.name(), w.id));
                    }
                }
            }
        }
        drop(seq);
        drop(ctl);
        if *self.last_status.borrow() != t {
            if let Ok(mut s) = self.core.shared.status.lock() {
                s.clone_from(&t);
            }
            *self.last_status.borrow_mut() = t;
        }
    }
}

async fn decide_loop(repl: Rc<Repl>) {
    let tick = Duration::from_millis((repl.heartbeat_ms() / 2).max(10));
    loop {
        repl.tick();
        monoio::time::sleep(tick).await;
    }
}

async fn heartbeats(repl: Rc<Repl>) {
    loop {
        let text = repl.report_text();
        for l in &repl.links {
            l.send(b"RS.HB", &[text.as_bytes()], LinkWait::Heartbeat);
        }
        monoio::select! {
            _ = monoio::time::sleep(Duration::from_millis(repl.heartbeat_ms())) => {},
            _ = repl.hb_now.wait() => {},
        }
    }
}

// ---- replica streams ------------------------------------------------------------------------

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))
}

async fn open_redis(repl: &Repl, addr: &str) -> Result<(Conn, String), String> {
    let sock = resolve(addr)?;
    let up = &repl.core.shared.upstream.naming(sock, crate::tls::host_of(addr));
    let cfg = &up.cfg;
    let mut s = connect_redis(up, sock, 2, 0).await?;
    let info = roundtrip(&mut s, &[vec![b"INFO".to_vec(), b"server".to_vec()]], cfg.connect_timeout_ms).await?;
    let text = String::from_utf8_lossy(&info[0]);
    let run_id = crate::replication::reply::info_field(&text, "run_id").unwrap_or("").to_string();
    Ok((s, run_id))
}

fn alive(repl: &Repl, gen: u64) -> bool {
    repl.gen.get() == gen && repl.seq.borrow().is_some()
}

async fn stream_task(repl: Rc<Repl>, s: usize, gen: u64, addr: String, wake: Rc<Signal>) {
    let max_backoff = Duration::from_millis(repl.core.shared.cfg.redis.reconnect_backoff_max_ms.max(10));
    let limit = Duration::from_millis(repl.core.shared.cfg.redis.request_timeout_ms);
    let mut backoff = Duration::from_millis(10);
    let mut warned = false;
    while alive(&repl, gen) {
        match open_redis(&repl, &addr).await {
            Ok((stream, run_id)) if alive(&repl, gen) => {
                warned = false;
                backoff = Duration::from_millis(10);
                if let Some(q) = repl.seq.borrow_mut().as_mut() {
                    q.on_up(s, &run_id);
                }
                repl.after_seq();
                let seen = Rc::new(Cell::new(0u64));
                let (rd, wr) = stream.into_split();
                let reason = monoio::select! {
                    r = stream_reader(&repl, s, gen, rd, &seen) => r,
                    r = stream_writer(&repl, s, gen, wr, &wake) => r,
                    r = stream_watchdog(&repl, s, gen, &seen, limit) => r,
                };
                if repl.gen.get() == gen {
                    if let Some(q) = repl.seq.borrow_mut().as_mut() {
                        q.on_down(s, &reason);
                    }
                    repl.after_seq();
                }
            }
            Ok(_) => return,
            Err(e) => {
                if !warned {
                    warn!(redis = %addr, "cannot reach replica Redis: {e}; retrying");
                    warned = true;
                }
            }
        }
        monoio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(max_backoff);
    }
}

async fn stream_writer(repl: &Repl, s: usize, gen: u64, mut wr: ConnWriter, wake: &Signal) -> String {
    loop {
        if repl.gen.get() != gen {
            return "no longer the writer".into();
        }
        let batch = match repl.seq.borrow_mut().as_mut() {
            Some(q) if q.streams[s].drop_conn => return "reconnecting to rebuild it".into(),
            Some(q) => q.take_batch(s),
            None => return "no longer the writer".into(),
        };
        match batch {
            Some(chunks) => {
                for chunk in chunks {
                    if let Err(e) = wr.write_all(chunk).await.0 {
                        return format!("write: {e}");
                    }
                }
            }
            None => wake.wait().await,
        }
    }
}

async fn stream_reader(repl: &Repl, s: usize, gen: u64, mut rd: ConnReader, seen: &Cell<u64>) -> String {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut skim = ReplySkimmer::new();
    loop {
        let (res, b) = read_more(&mut rd, buf, skim.bytes_hint(0)).await;
        buf = b;
        match res {
            Ok(0) => return "Redis closed the connection".into(),
            Err(e) => return format!("read: {e}"),
            Ok(_) => {}
        }
        if repl.gen.get() != gen {
            return "no longer the writer".into();
        }
        let now = unix_ms();
        loop {
            match skim.next_reply(&mut buf) {
                Ok(Some(r)) if r.first() == Some(&b'>') => {}
                Ok(Some(r)) => {
                    seen.set(seen.get() + 1);
                    let res = match repl.seq.borrow_mut().as_mut() {
                        Some(q) => q.on_reply(s, r, now),
                        None => return "no longer the writer".into(),
                    };
                    if let Err(e) = res {
                        return e.to_string();
                    }
                }
                Ok(None) => break,
                Err(e) => return e.to_string(),
            }
        }
        repl.after_seq();
    }
}

/// Fail the stream when it owes replies and none came for `limit` (Redis stalled).
async fn stream_watchdog(repl: &Repl, s: usize, gen: u64, seen: &Cell<u64>, limit: Duration) -> String {
    let tick = super::stall::tick_for(limit);
    let mut clock = super::stall::StallClock::default();
    loop {
        monoio::time::sleep(tick).await;
        if repl.gen.get() != gen {
            return "no longer the writer".into();
        }
        let waiting = repl.seq.borrow().as_ref().is_some_and(|q| q.streams[s].awaiting_replies());
        if clock.stalled(waiting, seen.get(), Instant::now(), limit, tick) {
            return format!("Redis did not answer within {} ms", limit.as_millis());
        }
    }
}

/// Full resync of stream `t`: walk every key of the source replica (SCAN on a connection of
/// its own) and queue a copy of each through the sequencer, a bounded number at a time.
async fn scan_task(repl: Rc<Repl>, t: usize, gen: u64) {
    if let Err(why) = scan_keys(&repl, t, gen).await {
        if repl.gen.get() == gen {
            if let Some(q) = repl.seq.borrow_mut().as_mut() {
                q.abort_resync(t, &why);
            }
            repl.after_seq();
        }
    }
}

/// The key scan of a full resync; `Err` when it failed (the resync then starts over), `Ok`
/// when done or no longer wanted.
async fn scan_keys(repl: &Rc<Repl>, t: usize, gen: u64) -> Result<(), String> {
    let (source, addr, node, resyncs) = {
        let seq = repl.seq.borrow();
        let Some(q) = seq.as_ref() else { return Ok(()) };
        let Some(src) = q.resync_source(t) else { return Ok(()) };
        (src, q.streams[src].addr.clone(), q.streams[t].node.clone(), q.streams[t].resyncs)
    };
    let still = |repl: &Repl| {
        repl.gen.get() == gen
            && repl.seq.borrow().as_ref().is_some_and(|q| {
                q.streams[t].state == ReplicaState::Resyncing
                    && q.streams[t].resyncs == resyncs
                    && q.resync_source(t) == Some(source)
            })
    };
    let timeout = repl.core.shared.cfg.redis.request_timeout_ms;
    let (mut conn, _) =
        open_redis(repl, &addr).await.map_err(|e| format!("cannot reach the source Redis {addr}: {e}"))?;
    let info = roundtrip(&mut conn, &[vec![b"INFO".to_vec(), b"keyspace".to_vec()]], timeout).await?;
    let dbs: Vec<u32> = String::from_utf8_lossy(&info[0])
        .lines()
        .filter_map(|l| l.strip_prefix("db")?.split(':').next()?.parse().ok())
        .collect();
    let mut copied = 0u64;
    let mut last_log = Instant::now();
    for db in dbs {
        roundtrip(&mut conn, &[crate::command::frames::select_args(db)], timeout).await?;
        let mut cursor = b"0".to_vec();
        loop {
            let cmd = vec![b"SCAN".to_vec(), cursor.clone(), b"COUNT".to_vec(), b"512".to_vec()];
            let r =
                roundtrip(&mut conn, &[cmd], timeout).await.map_err(|e| format!("SCAN on the source failed: {e}"))?;
            let parts = crate::replication::reply::elements(&r[0]).unwrap_or_default();
            if parts.len() != 2 {
                return Err(format!("unexpected SCAN reply: {}", String::from_utf8_lossy(&r[0])));
            }
            cursor = crate::replication::reply::bulk(&parts[0]).map(|c| c.to_vec()).unwrap_or_else(|| b"0".to_vec());
            let keys = crate::replication::reply::elements(&parts[1]).unwrap_or_default();
            for k in keys {
                let Some(key) = crate::replication::reply::bulk(&k).map(Bytes::copy_from_slice) else { continue };
                loop {
                    if !still(repl) {
                        return Ok(());
                    }
                    let out = repl.seq.borrow().as_ref().map(|q| q.copies_outstanding(t)).unwrap_or(0);
                    if out < COPIES_IN_FLIGHT {
                        break;
                    }
                    monoio::time::sleep(Duration::from_millis(1)).await;
                }
                let ok = repl.seq.borrow_mut().as_mut().is_some_and(|q| q.copy_key(db, key, source, t));
                if !ok {
                    return Err("the copy could not be queued".into());
                }
                copied += 1;
                repl.after_seq();
            }
            if last_log.elapsed() > Duration::from_secs(2) {
                info!(replica = %node, copied, "resync in progress");
                last_log = Instant::now();
            }
            if cursor == b"0" {
                break;
            }
        }
    }
    if still(repl) {
        if let Some(q) = repl.seq.borrow_mut().as_mut() {
            q.scan_done(t);
        }
        info!(replica = %node, keys = copied, "resync: every key queued; in sync once applied");
        repl.after_seq();
    }
    Ok(())
}

//! One client connection: a reader task that parses requests and acts on the session's
//! decisions, a writer task that sends replies in request order, and (when the client needs
//! one) a dedicated upstream connection with its own reader task.
//!
//! Replies arrive out of order from several lanes; `ClientOut` holds one entry per request in
//! request order and the writer sends the filled prefix. Output is bounded: the reader stops
//! taking requests while too many reply bytes wait, and a client in pub/sub or MONITOR mode
//! (whose output is not driven by its requests) is disconnected past its limit, like Redis's
//! client-output-buffer-limit.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt};
use tracing::{debug, warn};

use super::conn::{Conn, ConnReader, ConnWriter};
use super::io::read_more;
use super::sink::{ReplyTarget, Sink};
use super::stall::{tick_for, StallClock};
use super::upstream::{connect_redis_as, roundtrip};
use super::{Core, CoreMsg, Signal};
use crate::replication::native::Side;
use crate::replication::writer_request::WriterRequest;
use crate::resp::{self, ReplySkimmer, RequestParser};
use crate::session::{AclUser, Action, ClientInfo, ClientQuery, DedicatedUse, Forward, Lane, Session, Tag};

/// Stop reading requests while this many reply bytes wait to be written.
const BACKPRESSURE_BYTES: usize = 4 << 20;
/// ... or while this many requests wait for replies.
const BACKPRESSURE_ENTRIES: usize = 64 * 1024;

struct Entry {
    reply: Option<Bytes>,
    tag: Option<Tag>,
    discard: bool,
    /// The request this reply answers, for the command metrics: (metrics index, parsed at).
    stamp: Option<(u16, Instant)>,
}

#[derive(Default)]
struct ClientOut {
    entries: VecDeque<Entry>,
    /// Sequence number of `entries[0]`.
    base_seq: u64,
    /// Bytes of filled replies not yet written.
    ready_bytes: usize,
    /// Close once everything queued is written.
    close_after: bool,
    /// The connection is finished; drop anything that arrives.
    dead: bool,
}

/// A client connection's shared state (between its tasks and the lanes that answer it).
pub(crate) struct Client {
    pub id: u64,
    core: Rc<Core>,
    session: RefCell<Session>,
    out: RefCell<ClientOut>,
    wake_writer: Signal,
    wake_reader: Signal,
    closing: Cell<bool>,
    close_signal: Signal,
    /// What the registry (CLIENT LIST) last got from this client.
    published: RefCell<ClientInfo>,
    /// Fired by `kill`: aborts a write blocked on a client that no longer reads, so the
    /// connection (and its `max_clients` slot) is released now, not when the peer reads.
    dead_signal: Signal,
    /// The request being handled (metrics): its first reply slot takes it.
    stamp: Cell<Option<(u16, Instant)>>,
}

impl ReplyTarget for Client {
    fn deliver(&self, seq: u64, reply: bytes::Bytes) {
        self.fill(seq, reply)
    }
}

impl Client {
    /// Deliver the reply to request `seq`.
    pub fn fill(&self, seq: u64, reply: Bytes) {
        let tag = {
            let mut out = self.out.borrow_mut();
            if out.dead || seq < out.base_seq {
                return;
            }
            let idx = (seq - out.base_seq) as usize;
            let len = reply.len();
            let Some(e) = out.entries.get_mut(idx) else { return };
            if e.reply.is_some() {
                return;
            }
            let discard = e.discard;
            if let Some((cmd, at)) = e.stamp.take() {
                let error = matches!(reply.first(), Some(b'-' | b'!'));
                self.core.metrics.replied(cmd, at.elapsed(), error);
            }
            e.reply = Some(reply);
            let tag = e.tag.take();
            if !discard {
                out.ready_bytes += len;
            }
            tag
        };
        if let Some(tag) = tag {
            self.session.borrow_mut().completed(tag);
        }
        self.check_output_limit();
        self.wake_writer.notify();
        self.wake_reader.notify();
    }

    /// Queue a reply that answers no request of this client's (pub/sub messages, MONITOR
    /// lines, RESP3 pushes).
    fn push_unsolicited(&self, reply: Bytes) {
        {
            let mut out = self.out.borrow_mut();
            if out.dead {
                return;
            }
            out.ready_bytes += reply.len();
            out.entries.push_back(Entry { reply: Some(reply), tag: None, discard: false, stamp: None });
        }
        self.check_output_limit();
        self.wake_writer.notify();
    }

    /// Reserve the next reply slot; returns its sequence number.
    fn push_pending(&self, tag: Option<Tag>, discard: bool) -> u64 {
        let mut out = self.out.borrow_mut();
        let stamp = self.stamp.take();
        out.entries.push_back(Entry { reply: None, tag, discard, stamp });
        out.base_seq + out.entries.len() as u64 - 1
    }

    fn push_local(&self, reply: Bytes) {
        let seq = self.push_pending(None, false);
        self.fill(seq, reply);
    }

    fn check_output_limit(&self) {
        let ready = self.out.borrow().ready_bytes;
        // Both limits are at least 64 KiB (config validation): skip the lookups below that.
        if ready <= 64 * 1024 {
            return;
        }
        let shared = &self.core.shared;
        let raw = self.session.borrow().is_raw();
        let limit = if raw { &shared.pubsub_output_buffer_limit } else { &shared.output_buffer_limit };
        let limit = limit.load(Ordering::Relaxed);
        let over = {
            let out = self.out.borrow();
            !out.dead && out.ready_bytes > limit
        };
        if over {
            warn!(client = self.id, limit, "client output buffer limit reached: closing the client connection");
            self.kill();
        }
    }

    /// Close now, dropping whatever is owed (output limit, CLIENT KILL).
    /// Whether this client authenticated as Redis ACL user `user` (with those credentials).
    pub fn is_user(&self, user: &AclUser) -> bool {
        self.session.borrow().user.as_ref() == Some(user)
    }

    pub fn kill(&self) {
        {
            let mut out = self.out.borrow_mut();
            out.dead = true;
            out.entries.clear();
            out.ready_bytes = 0;
        }
        self.closing.set(true);
        self.close_signal.notify();
        self.dead_signal.notify();
        self.wake_writer.notify();
        self.wake_reader.notify();
    }

    /// Graceful stop: stop reading, finish what is in flight, close.
    pub fn begin_close(&self) {
        self.closing.set(true);
        self.close_signal.notify();
        self.wake_reader.notify();
    }

    fn is_dead(&self) -> bool {
        self.out.borrow().dead
    }

    fn backpressured(&self) -> bool {
        let out = self.out.borrow();
        out.ready_bytes > BACKPRESSURE_BYTES || out.entries.len() > BACKPRESSURE_ENTRIES
    }
}

impl Client {
    /// Update the registry when name, database, protocol or mode changed.
    fn publish_info(&self) {
        let session = self.session.borrow();
        if session.info_matches(&self.published.borrow()) {
            return;
        }
        let info = session.info();
        if let Ok(mut reg) = self.core.shared.registry.lock() {
            reg.insert(self.id, info.clone());
        }
        *self.published.borrow_mut() = info;
    }
}

/// Answer CLIENT LIST / CLIENT KILL from the registry of every core's clients. Returns true
/// when the client killed itself (it gets the reply, then the connection closes).
fn clients_query(client: &Rc<Client>, q: ClientQuery) -> bool {
    let shared = &client.core.shared;
    let mut infos: Vec<ClientInfo> = match shared.registry.lock() {
        Ok(reg) => reg.values().cloned().collect(),
        Err(_) => Vec::new(),
    };
    // The caller's own entry, fresh (its current command included).
    let me = client.session.borrow().info();
    for c in infos.iter_mut().filter(|c| c.id == me.id) {
        *c = me.clone();
    }
    match q {
        ClientQuery::List { ids, kind } => {
            let mut shown: Vec<&ClientInfo> = infos
                .iter()
                .filter(|c| ids.as_ref().is_none_or(|ids| ids.contains(&c.id)))
                .filter(|c| match kind.as_deref() {
                    None => true,
                    Some("normal") => c.flags != 'P',
                    Some("pubsub") => c.flags == 'P',
                    Some(_) => false,
                })
                .collect();
            shown.sort_by_key(|c| c.id);
            let text: String = shown.iter().map(|c| c.line()).collect();
            client.push_local(resp::bulk(text.as_bytes()));
            false
        }
        ClientQuery::Kill(filter) => {
            let mut killed = 0;
            let mut me = false;
            for c in infos.iter().filter(|c| filter.matches(c)) {
                if c.id == client.id {
                    if filter.skip_me && !filter.legacy {
                        continue;
                    }
                    me = true;
                } else if c.core == client.core.idx {
                    let other = client.core.clients.borrow().get(&c.id).and_then(std::rc::Weak::upgrade);
                    if let Some(other) = other {
                        other.kill();
                    }
                } else if let Some(tx) = shared.inboxes.get(c.core) {
                    let _ = tx.try_send(vec![CoreMsg::Kill { client: c.id }]);
                }
                killed += 1;
            }
            let reply = match (filter.legacy, killed) {
                (true, 0) => resp::error("ERR No such client"),
                (true, _) => resp::simple("OK"),
                (false, n) => resp::int(n),
            };
            client.push_local(reply);
            me
        }
    }
}

/// Take a newly accepted connection: enforce `max_clients`, then start its tasks.
pub(crate) fn accept(core: &Rc<Core>, stream: Conn, peer: SocketAddr, local: String) {
    let shared = &core.shared;
    let n = shared.clients.fetch_add(1, Ordering::AcqRel) + 1;
    if n > shared.max_clients.load(Ordering::Relaxed) {
        shared.clients.fetch_sub(1, Ordering::AcqRel);
        core.metrics.clients_rejected.inc();
        monoio::spawn(async move {
            let mut stream = stream;
            let _ = stream.write_all(resp::error("ERR max number of clients reached")).await;
            let _ = stream.shutdown().await;
        });
        return;
    }
    core.metrics.clients_accepted.inc();
    let id = shared.next_client_id.fetch_add(1, Ordering::Relaxed);
    let session = {
        let env = core.env.borrow();
        Session::new(id, core.idx, &env, peer.to_string(), local)
    };
    let info = session.info();
    if let Ok(mut reg) = shared.registry.lock() {
        reg.insert(id, info.clone());
    }
    let client = Rc::new(Client {
        id,
        core: core.clone(),
        published: RefCell::new(info),
        session: RefCell::new(session),
        out: RefCell::new(ClientOut::default()),
        wake_writer: Signal::default(),
        wake_reader: Signal::default(),
        closing: Cell::new(false),
        close_signal: Signal::default(),
        dead_signal: Signal::default(),
        stamp: Cell::new(None),
    });
    core.clients.borrow_mut().insert(id, Rc::downgrade(&client));
    let core = core.clone();
    monoio::spawn(async move {
        let (rd, wr) = stream.into_split();
        let writer = monoio::spawn(write_loop(client.clone(), wr));
        read_loop(client.clone(), rd).await;
        if core.shared.cfg.mirror() {
            // Its WATCH and blocked pops live at the writer's sequencer: forget them.
            if core.idx == 0 {
                let repl = core.repl.borrow().clone();
                if let Some(r) = repl {
                    r.client_gone(client.id);
                }
            } else {
                core.send(0, CoreMsg::ClientGone { client: client.id });
            }
        }
        let _ = writer.await;
        client.kill();
        core.clients.borrow_mut().remove(&client.id);
        if let Ok(mut reg) = core.shared.registry.lock() {
            reg.remove(&client.id);
        }
        core.shared.clients.fetch_sub(1, Ordering::AcqRel);
        debug!(client = client.id, "client closed");
    });
}

/// What a dedicated connection owes: one entry per request sent, in order.
#[derive(Clone, Copy)]
enum Owed {
    /// A SELECT/HELLO the proxy sent in front of a command: its reply goes to nobody, but
    /// if it failed the connection is no longer where the proxy thinks, and is retired.
    Setup,
    /// The reply to the client's request `seq`; blocking ones may legitimately take long.
    /// `alone`: a native-mode write sent without `WAIT` (no replica linked), counted as
    /// acknowledged on the primary alone if Redis accepts it.
    Reply { seq: u64, blocking: bool, alone: bool },
    /// Native, `write_ack = "all"`: the reply to `seq`, held until the `WAIT` after it answers.
    Acked { seq: u64, blocking: bool },
    /// That `WAIT`; `peer`: the connection goes to the peer's Redis; `generation`: the route's
    /// when it was sent.
    Wait { peer: bool, generation: u64 },
}

/// State shared between the client's reader (which writes requests), the dedicated
/// connection's reader task and its stall watch.
struct DedicatedLink {
    owed: RefCell<VecDeque<Owed>>,
    alive: Cell<bool>,
    replies_seen: Cell<u64>,
    stalled: Signal,
    /// The client has replaced this connection: when it ends, the client's state (which
    /// now belongs to the new one) must not be touched.
    retired: Cell<bool>,
}

/// The client's dedicated upstream connection (write side; a task reads the replies).
struct Dedicated {
    wr: ConnWriter,
    link: Rc<DedicatedLink>,
    db: u32,
    proto: u8,
    /// Native mode: it goes to the peer's Redis.
    peer: bool,
    /// Native mode: the run of that Redis it reaches.
    run: u64,
    /// The Redis ACL user it authenticated as (`None`: the proxy's own identity).
    user: Option<AclUser>,
}

async fn read_loop(client: Rc<Client>, mut rd: ConnReader) {
    let max_bulk = client.core.shared.cfg.client.proto_max_bulk_len.0 as usize;
    let mut parser = RequestParser::new(max_bulk);
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut held: Option<crate::resp::Request> = None;
    let mut dedicated: Option<Dedicated> = None;
    // Native mode: when the request in `held` started waiting for a primary, and whether it
    // waits for one now (re-offered on a timer, not on a completion).
    let mut hold_since: Option<std::time::Instant> = None;
    let mut holding = false;
    let connected_at = Instant::now();
    let mut read_at = connected_at;
    let hold_limit = std::time::Duration::from_millis(client.core.shared.cfg.redis.request_timeout_ms);
    'conn: loop {
        // Act on everything already buffered.
        loop {
            if client.closing.get() || client.is_dead() {
                break 'conn;
            }
            if client.backpressured() {
                break;
            }
            parser.set_unauthenticated(!client.session.borrow().authed);
            let (req, fresh) = match held.take() {
                Some(r) => (r, false),
                None => match parser.parse(&mut buf) {
                    Ok(Some(r)) => (r, true),
                    Ok(None) => break,
                    Err(e) => {
                        // Not a request: no command's figures.
                        client.stamp.set(None);
                        client.push_local(resp::error(&format!("ERR {e}")));
                        break 'conn;
                    }
                },
            };
            // Requests are stamped with the time their bytes were read (one clock read per
            // socket read, not per request).
            let parsed_at = fresh.then_some(read_at);
            let action = {
                let env = client.core.env.borrow();
                client.session.borrow_mut().on_request(&req, &env)
            };
            if let Some(at) = parsed_at {
                // A held request run again keeps its first stamp (and is counted once). The
                // session looked the command up already: its answer names the counter.
                let cmd = client
                    .session
                    .borrow()
                    .current_command()
                    .map_or_else(crate::metrics::unknown_command, crate::metrics::command_index);
                client.core.metrics.call(cmd);
                client.stamp.set(Some((cmd, at)));
            }
            client.publish_info();
            // Native mode: a command whose Redis connection is down right now (a failover
            // under way) waits like a held one instead of failing at once.
            let action = match action {
                Action::Forward(f) if native_lane_down(&client, &f) => {
                    client.session.borrow_mut().completed(f.tag);
                    Action::Hold
                }
                a => a,
            };
            if !matches!(action, Action::Hold) {
                hold_since = None;
            }
            // The client became another Redis user: a dedicated connection opened as the
            // previous one must not carry its requests.
            retire_if_other_user(&client, &mut dedicated).await;
            match action {
                Action::Wait => {
                    held = Some(req);
                    break;
                }
                Action::Hold => {
                    let since = *hold_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() >= hold_limit {
                        hold_since = None;
                        client.push_local(resp::error(&format!(
                            "TRYAGAIN resplica: no primary Redis reachable for {} ms (the pair is forming, failing over or merging)",
                            hold_limit.as_millis()
                        )));
                        continue;
                    }
                    held = Some(req);
                    holding = true;
                    break;
                }
                Action::Nothing => {}
                Action::Reply(r) => client.push_local(r),
                Action::Close(r) => {
                    client.push_local(r);
                    break 'conn;
                }
                Action::Reset(r) => {
                    if let Some(mut d) = dedicated.take() {
                        let _ = d.wr.shutdown().await;
                    }
                    client.push_local(r);
                }
                Action::Forward(f) => dispatch(&client, f, &mut dedicated).await,
                Action::Auth { user, hello } => {
                    // Inline: the requests after it are read once the client is that user.
                    match verify_user(&client.core, &user).await {
                        Ok(()) => {
                            let reply = client.session.borrow_mut().acl_verified(user, hello);
                            if hello {
                                // Offered again at once, now verified, to complete.
                                held = Some(req);
                                continue;
                            }
                            retire_if_other_user(&client, &mut dedicated).await;
                            client.push_local(reply);
                        }
                        Err(e) => client.push_local(e),
                    }
                }
                Action::Status => {
                    let text = client.core.shared.status.lock().map(|s| s.clone()).unwrap_or_default();
                    let text = if text.is_empty() { "role:single\n".to_string() } else { text };
                    client.push_local(resp::bulk(text.as_bytes()));
                }
                Action::Clients(q) => {
                    // The proxy answers these from its own registry; an ACL user may run them
                    // only if Redis lets that user run them (asked with a harmless form).
                    let user = client.session.borrow().user.clone();
                    if let Some(user) = user {
                        let probe: &[&[u8]] = match &q {
                            ClientQuery::List { .. } => &[b"CLIENT", b"LIST", b"ID", b"0"],
                            ClientQuery::Kill(_) => &[b"CLIENT", b"KILL", b"ID", b"0"],
                        };
                        if let Some(refused) = refused_for(&client.core, &user, probe).await {
                            client.push_local(refused);
                            continue;
                        }
                    }
                    if clients_query(&client, q) {
                        break 'conn;
                    }
                }
            }
        }
        if holding {
            holding = false;
            monoio::select! {
                _ = monoio::time::sleep(std::time::Duration::from_millis(10)) => {},
                _ = client.close_signal.wait() => {},
            }
            continue;
        }
        if held.is_some() || client.backpressured() {
            monoio::select! {
                _ = client.wake_reader.wait() => {},
                _ = client.close_signal.wait() => {},
            }
            continue;
        }
        // Need more bytes. A client that must AUTH and has not gets `[client] auth_timeout_ms`
        // from its connection to do so.
        let hint = parser.bytes_hint(buf.len());
        let auth_left = {
            let limit = client.core.shared.cfg.client.auth_timeout_ms;
            let must = !client.session.borrow().authed && !client.core.env.borrow().password.is_empty();
            (must && limit > 0).then(|| std::time::Duration::from_millis(limit).saturating_sub(connected_at.elapsed()))
        };
        let read = match auth_left {
            Some(left) => monoio::select! {
                r = read_more(&mut rd, buf, hint) => Some(r),
                _ = client.close_signal.wait() => None,
                _ = monoio::time::sleep(left) => {
                    client.push_local(resp::error("ERR resplica: authentication timed out ([client] auth_timeout_ms)"));
                    None
                },
            },
            None => monoio::select! {
                r = read_more(&mut rd, buf, hint) => Some(r),
                _ = client.close_signal.wait() => None,
            },
        };
        let Some((res, b)) = read else { break };
        buf = b;
        match res {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                read_at = Instant::now();
                client.core.metrics.bytes_in.add(n as u64)
            }
        }
    }
    // Let the writer flush what is owed, then close.
    client.out.borrow_mut().close_after = true;
    client.wake_writer.notify();
    if let Some(mut d) = dedicated.take() {
        let _ = d.wr.shutdown().await;
    }
}

/// The shared connection of a Redis ACL user's client for `f` (its own core's: a user's
/// requests do not hop to a slot's core), or `None` for the default user.
fn user_lane(client: &Client, f: &Forward) -> Option<Rc<super::lane::Lane>> {
    let s = client.session.borrow();
    let user = s.user.as_ref()?;
    match f.lane {
        Lane::Shared(_) => Some(client.core.user_lane(user, s.proto, false)),
        Lane::PeerShared => Some(client.core.user_lane(user, s.proto, true)),
        _ => None,
    }
}

/// Native mode: `f` goes to a shared connection that is down now.
fn native_lane_down(client: &Client, f: &Forward) -> bool {
    let core = &client.core;
    if core.shared.native.is_none() {
        return false;
    }
    let proto = client.session.borrow().proto;
    let user = user_lane(client, f);
    let lane = match (&user, &f.lane) {
        (Some(l), _) => l,
        (None, Lane::Shared(owner)) if *owner == core.idx => core.lane(proto),
        (None, Lane::PeerShared) => core.peer_lane(proto),
        _ => return false,
    };
    if f.write {
        !lane.writable()
    } else {
        !lane.is_connected()
    }
}

async fn dispatch(client: &Rc<Client>, f: Forward, dedicated: &mut Option<Dedicated>) {
    let core = &client.core;
    if let Some(lane) = user_lane(client, &f) {
        let seq = client.push_pending(Some(f.tag), f.discard);
        if let Err(reply) = lane.enqueue(f.db, f.frame, Sink::To(client.clone(), seq), f.write) {
            client.fill(seq, reply);
        }
        return;
    }
    match f.lane {
        Lane::Shared(owner) if owner == core.idx => {
            let proto = client.session.borrow().proto;
            let seq = client.push_pending(Some(f.tag), f.discard);
            let lane = core.lane(proto);
            if !lane.is_connected() && core.shared.cfg.mirror() {
                // Pair mode: the local Redis is down; the writer's replicas serve the read.
                // (Parsed again here: a shared lane's forward carries only its frame, and
                // this is the failure path.)
                core.shared.local_in_sync.store(false, std::sync::atomic::Ordering::Relaxed);
                match WriterRequest::decode(&f.frame, false) {
                    Some(work) => send_writer(client, seq, f.db, proto, work),
                    None => client.fill(seq, resp::error("ERR resplica: not a request for the writer path")),
                }
            } else if let Err(reply) = lane.enqueue(f.db, f.frame, Sink::To(client.clone(), seq), f.write) {
                client.fill(seq, reply);
            }
        }
        Lane::PeerShared => {
            let proto = client.session.borrow().proto;
            let seq = client.push_pending(Some(f.tag), f.discard);
            let lane = core.peer_lane(proto);
            if let Err(reply) = lane.enqueue(f.db, f.frame, Sink::To(client.clone(), seq), f.write) {
                client.fill(seq, reply);
            }
        }
        Lane::Shared(owner) => {
            let proto = client.session.borrow().proto;
            let seq = client.push_pending(Some(f.tag), f.discard);
            core.send(
                owner,
                CoreMsg::Request { from: core.idx, client: client.id, seq, db: f.db, proto, frame: f.frame },
            );
        }
        Lane::Writer => {
            let proto = client.session.borrow().proto;
            let seq = client.push_pending(Some(f.tag), f.discard);
            match f.writer {
                Some(work) => send_writer(client, seq, f.db, proto, work),
                None => client.fill(seq, resp::error("ERR resplica: not a request for the writer path")),
            }
        }
        Lane::Dedicated => {
            let (db, proto) = {
                let s = client.session.borrow();
                (s.db, s.proto)
            };
            if let Some(dead) = dedicated.take_if(|d| !d.link.alive.get()) {
                // Close it so that its reader task sees EOF and ends.
                dead.link.retired.set(true);
                monoio::spawn(async move {
                    let mut wr = dead.wr;
                    let _ = wr.shutdown().await;
                });
            }
            let fresh = dedicated.is_none();
            if dedicated.is_none() {
                // A spare connection in db 0 goes out with no round trip; SELECT and HELLO are
                // then sent in the same write as the command. Not for a command Redis runs
                // while busy in another database (the SELECT could fail and it would not).
                let usable = f.db == 0 || f.any_db || !f.allow_busy;
                let local = core.dedicated_target() == core.shared.cfg.redis.address;
                // (Spare connections are the default user's.)
                let as_default = client.session.borrow().user.is_none();
                let warm = if usable && local && as_default { core.warm.borrow_mut().pop() } else { None };
                if let Some(w) = warm {
                    core.warm_refill.notify();
                    *dedicated = Some(adopt_dedicated(client, w, 0, 2, false));
                }
            }
            if dedicated.is_none() {
                // A database-independent command (SCRIPT KILL) must not depend on a SELECT,
                // which Redis refuses while a script runs.
                let open_db = if f.any_db { 0 } else { db };
                match open_dedicated(client, open_db, proto).await {
                    Ok(d) => *dedicated = Some(d),
                    Err(e) => {
                        let seq = client.push_pending(Some(f.tag), f.discard);
                        client.session.borrow_mut().dedicated_lost();
                        client
                            .fill(seq, resp::error(&format!("ERR resplica: cannot open a connection to Redis ({e})")));
                        return;
                    }
                }
            }
            // Native mode: a connection opened now must reach the run of that Redis the
            // control plane decided on (a Redis restarted empty takes nothing before it was
            // compared).
            let unvetted = fresh
                && f.dedicated != DedicatedUse::Raw
                && dedicated.as_ref().is_some_and(|d| {
                    let side = if d.peer { Side::Peer } else { Side::Local };
                    core.shared.native.as_ref().is_some_and(|n| !n.approved(side, d.run))
                });
            if unvetted {
                if let Some(d) = dedicated.take() {
                    d.link.retired.set(true);
                    monoio::spawn(async move {
                        let mut wr = d.wr;
                        let _ = wr.shutdown().await;
                    });
                }
                client.core.shared.upstream_ids.set(client.id, None);
                let seq = client.push_pending(Some(f.tag), f.discard);
                client.session.borrow_mut().dedicated_lost();
                client.fill(
                    seq,
                    resp::error("TRYAGAIN resplica: that Redis restarted and is being compared with its peer; retry"),
                );
                return;
            }
            let Some(d) = dedicated.as_mut() else { return };
            let mut frames = BytesMut::new();
            // Bring a reused connection to the client's database and protocol.
            if d.db != f.db && !f.any_db {
                frames.extend_from_slice(&crate::command::frames::select(f.db));
                d.link.owed.borrow_mut().push_back(Owed::Setup);
                d.db = f.db;
            }
            if d.proto != proto {
                frames.extend_from_slice(&crate::command::frames::hello(proto));
                d.link.owed.borrow_mut().push_back(Owed::Setup);
                d.proto = proto;
            }
            // Native, write_ack = "all": the reply waits for the replica, like a lane's batch.
            let acked = f.write && f.dedicated != DedicatedUse::Raw;
            let (wait, alone) = match (&core.shared.native, &core.native_wait) {
                (Some(route), Some(w)) if acked && route.replica_linked() => (Some(w.clone()), false),
                (Some(_), Some(_)) if acked => (None, true),
                _ => (None, false),
            };
            if f.dedicated == DedicatedUse::Raw {
                // Replies flow straight through; nothing to match.
            } else {
                let seq = client.push_pending(Some(f.tag), f.discard);
                let blocking = matches!(f.dedicated, DedicatedUse::Counted { blocking: true });
                let mut owed = d.link.owed.borrow_mut();
                if wait.is_some() {
                    owed.push_back(Owed::Acked { seq, blocking });
                    let generation = core.shared.native.as_ref().map_or(0, |n| n.generation());
                    owed.push_back(Owed::Wait { peer: d.peer, generation });
                } else {
                    owed.push_back(Owed::Reply { seq, blocking, alone });
                }
            }
            let res = if frames.is_empty() && wait.is_none() {
                d.wr.write_all(f.frame).await.0
            } else {
                frames.extend_from_slice(&f.frame);
                if let Some(w) = &wait {
                    frames.extend_from_slice(w);
                }
                d.wr.write_all(frames.freeze()).await.0
            };
            if res.is_err() {
                d.link.alive.set(false);
            }
            // A SELECT sent by the client itself moves the dedicated connection too.
            if !f.any_db {
                d.db = client.session.borrow().db;
            }
        }
    }
}

/// Close the client's dedicated connection if it was opened as another Redis user than the
/// client is now; the next command that needs one opens it as the client's current user.
async fn retire_if_other_user(client: &Client, dedicated: &mut Option<Dedicated>) {
    let other = dedicated.as_ref().is_some_and(|d| d.user != client.session.borrow().user);
    if !other {
        return;
    }
    if let Some(mut d) = dedicated.take() {
        d.link.retired.set(true);
        client.core.shared.upstream_ids.set(client.id, None);
        let _ = d.wr.shutdown().await;
    }
}

/// Redis's refusal (`NOPERM`, or why Redis could not be asked) of `cmd` run as `user`, or
/// `None` when Redis lets that user run it.
async fn refused_for(core: &Core, user: &AclUser, cmd: &[&[u8]]) -> Option<bytes::Bytes> {
    let cfg = &core.shared.cfg.redis;
    let addr = core.dedicated_target();
    let mut conn = match connect_redis_as(&core.shared.upstream, addr, 2, 0, Some(user)).await {
        Ok(c) => c,
        Err(e) => return Some(resp::error(&format!("ERR resplica: cannot check the user's permissions: {e}"))),
    };
    let args: Vec<Vec<u8>> = cmd.iter().map(|a| a.to_vec()).collect();
    match roundtrip(&mut conn, &[args], cfg.connect_timeout_ms).await {
        Ok(r) => r.into_iter().next().filter(|r| r.starts_with(b"-NOPERM")),
        Err(e) => Some(resp::error(&format!("ERR resplica: cannot check the user's permissions: {e}"))),
    }
}

/// Ask Redis whether `user`'s credentials are good (`AUTH user pass` on a connection of its
/// own, to the Redis that serves writes): `Err` is the reply for the client (Redis's own
/// error, e.g. WRONGPASS, or why Redis could not be asked).
async fn verify_user(core: &Core, user: &AclUser) -> Result<(), bytes::Bytes> {
    let cfg = &core.shared.cfg.redis;
    let addr = core.dedicated_target();
    let mut stream = match core.shared.upstream.open(addr).await {
        Ok(s) => s,
        Err(e) => {
            return Err(resp::error(&format!(
                "ERR resplica: cannot reach Redis at {addr} to check the credentials: {e}"
            )))
        }
    };
    let auth = vec![b"AUTH".to_vec(), user.name.to_vec(), user.pass.to_vec()];
    match roundtrip(&mut stream, &[auth], cfg.connect_timeout_ms).await {
        Ok(replies) => match replies.into_iter().next() {
            Some(r) if !resp::is_error(&r) => Ok(()),
            Some(r) => Err(r),
            None => Err(resp::error("ERR resplica: Redis gave no answer to AUTH")),
        },
        Err(e) => Err(resp::error(&format!("ERR resplica: checking the credentials with Redis failed: {e}"))),
    }
}

/// Send a request on the pair's writer path (core 0's replication shell).
fn send_writer(client: &Rc<Client>, seq: u64, db: u32, proto: u8, work: WriterRequest) {
    let core = &client.core;
    if core.idx == 0 {
        let repl = core.repl.borrow().clone();
        match repl {
            Some(r) => r.submit_client(Sink::To(client.clone(), seq), client.id, db, proto, work),
            None => client.fill(seq, resp::error("ERR resplica: this node has no peers")),
        }
    } else {
        core.send(0, CoreMsg::Writer { from: core.idx, client: client.id, seq, db, proto, work });
    }
}

async fn open_dedicated(client: &Rc<Client>, db: u32, proto: u8) -> Result<Dedicated, String> {
    let target = client.core.dedicated_target();
    let user = client.session.borrow().user.clone();
    let conn = connect_spare(&client.core, target, proto, db, user.as_ref()).await?;
    let peer = target != client.core.shared.cfg.redis.address;
    Ok(adopt_dedicated(client, conn, db, proto, peer))
}

/// Connect and authenticate a connection for some client's exclusive use, and learn Redis's
/// id for it, so that other clients can name its owner in CLIENT TRACKING REDIRECT / CLIENT
/// UNBLOCK by the id the proxy gave.
async fn connect_spare(
    core: &Core,
    addr: std::net::SocketAddr,
    proto: u8,
    db: u32,
    user: Option<&AclUser>,
) -> Result<WarmConn, String> {
    let mut stream = connect_redis_as(&core.shared.upstream, addr, proto, db, user).await?;
    let timeout = core.shared.cfg.redis.connect_timeout_ms;
    let mut cmds = vec![vec![b"CLIENT".to_vec(), b"ID".to_vec()]];
    if core.shared.native.is_some() {
        // Which run of that Redis it reaches (see `Lane::writable`).
        cmds.push(vec![b"INFO".to_vec(), b"server".to_vec()]);
    }
    let replies = roundtrip(&mut stream, &cmds, timeout).await?;
    let upstream_id = replies.first().and_then(|r| resp::integer_reply(r)).filter(|&i| i > 0).map(|i| i as u64);
    let run = match replies.get(1) {
        // An ACL user without INFO permission: asked with the proxy's own identity.
        Some(r) if resp::is_error(r) => super::upstream::run_via_own_identity(&core.shared.upstream, addr).await,
        Some(r) => super::upstream::run_from_info(r),
        None => 0,
    };
    Ok(WarmConn { stream, upstream_id, run })
}

/// A connected, authenticated upstream connection not yet given to a client.
pub(crate) struct WarmConn {
    stream: Conn,
    /// Redis's id for it (`CLIENT ID`).
    upstream_id: Option<u64>,
    /// Native mode: the run of the Redis it reaches (`route::run_id_hash`; 0: unknown).
    run: u64,
}

/// Make `conn` the client's dedicated connection: start its reader and stall watch.
fn adopt_dedicated(client: &Rc<Client>, conn: WarmConn, db: u32, proto: u8, peer: bool) -> Dedicated {
    let run = conn.run;
    client.core.shared.upstream_ids.set(client.id, conn.upstream_id);
    let (rd, wr) = conn.stream.into_split();
    let link = Rc::new(DedicatedLink {
        owed: RefCell::new(VecDeque::new()),
        alive: Cell::new(true),
        replies_seen: Cell::new(0),
        stalled: Signal::default(),
        retired: Cell::new(false),
    });
    monoio::spawn(dedicated_reader(client.clone(), rd, link.clone()));
    let limit = std::time::Duration::from_millis(client.core.shared.cfg.redis.request_timeout_ms);
    monoio::spawn(dedicated_stall_watch(link.clone(), limit));
    let user = client.session.borrow().user.clone();
    Dedicated { wr, link, db, proto, peer, run, user }
}

/// Spare dedicated connections kept per core.
const WARM_TARGET: usize = 2;

/// Keep `WARM_TARGET` spare connections ready on this core; refill when one is taken.
pub(crate) async fn keep_warm(core: Rc<Core>) {
    let mut backoff = std::time::Duration::from_millis(50);
    loop {
        if core.shared.shutting_down.load(Ordering::Relaxed) {
            return;
        }
        if core.warm.borrow().len() >= WARM_TARGET {
            core.warm_refill.wait().await;
            continue;
        }
        match connect_spare(&core, core.shared.cfg.redis.address, 2, 0, None).await {
            Ok(conn) => {
                core.warm.borrow_mut().push(conn);
                backoff = std::time::Duration::from_millis(50);
            }
            Err(_) => {
                // Redis is down: the lanes report it; retry quietly.
                monoio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
            }
        }
    }
}

/// The lanes' stall detector, for the dedicated connection: when a non-blocking request
/// (inside MULTI, say) waits longer than the request timeout with no reply, the connection is
/// abandoned and the client gets an error instead of a hang.
async fn dedicated_stall_watch(link: Rc<DedicatedLink>, limit: std::time::Duration) {
    let tick = tick_for(limit);
    let mut clock = StallClock::default();
    while link.alive.get() {
        monoio::time::sleep(tick).await;
        let waiting = matches!(
            link.owed.borrow().front(),
            Some(
                Owed::Setup
                    | Owed::Wait { .. }
                    | Owed::Reply { blocking: false, .. }
                    | Owed::Acked { blocking: false, .. }
            )
        );
        if clock.stalled(waiting, link.replies_seen.get(), std::time::Instant::now(), limit, tick) {
            link.stalled.notify();
            return;
        }
    }
}

async fn dedicated_reader(client: Rc<Client>, mut rd: ConnReader, link: Rc<DedicatedLink>) {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    // Replies waiting for the WAIT behind them.
    let mut held: VecDeque<(u64, bytes::Bytes)> = VecDeque::new();
    let mut skim = ReplySkimmer::new();
    let reason = 'read: loop {
        let hint = skim.bytes_hint(buf.len());
        let read = monoio::select! {
            r = read_more(&mut rd, buf, hint) => Some(r),
            _ = link.stalled.wait() => None,
        };
        let Some((res, b)) = read else { break "Redis did not answer within the request timeout" };
        buf = b;
        match res {
            Ok(0) => break "Redis closed the connection",
            Err(_) => break "read error",
            Ok(_) => {}
        }
        loop {
            match skim.next_reply(&mut buf) {
                Ok(Some(reply)) if reply.first() == Some(&b'>') => {
                    // RESP3 push (invalidation, pub/sub message): out of band, never a reply.
                    client.push_unsolicited(reply);
                }
                Ok(Some(reply)) => {
                    link.replies_seen.set(link.replies_seen.get() + 1);
                    let next = link.owed.borrow_mut().pop_front();
                    match next {
                        Some(Owed::Reply { seq, alone, .. }) => {
                            if alone && !resp::is_error(&reply) {
                                if let Some(route) = &client.core.shared.native {
                                    route.acks_on_primary_alone.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            client.fill(seq, reply)
                        }
                        Some(Owed::Acked { seq, .. }) => held.push_back((seq, reply)),
                        Some(Owed::Wait { peer, generation }) => {
                            let confirmed = resp::integer_reply(&reply).is_some_and(|n| n >= 1);
                            if let Some((seq, r)) = held.pop_front() {
                                let r = match &client.core.shared.native {
                                    Some(route) if !confirmed => {
                                        let side = if peer { Side::Peer } else { Side::Local };
                                        super::lane::unconfirmed(route, side, generation, None, r)
                                    }
                                    _ => r,
                                };
                                client.fill(seq, r);
                            }
                        }
                        Some(Owed::Setup) => {
                            if resp::is_error(&reply) {
                                warn!(
                                    client = client.id,
                                    "dedicated connection set-up failed: {}",
                                    String::from_utf8_lossy(&reply).trim()
                                );
                                link.alive.set(false);
                            }
                        }
                        None => {
                            if client.session.borrow().is_raw() {
                                client.push_unsolicited(reply);
                            } else {
                                break 'read "Redis sent a reply nobody asked for";
                            }
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => break 'read "invalid reply from Redis",
            }
        }
    };
    link.alive.set(false);
    let retired = link.retired.get();
    if !retired {
        client.core.shared.upstream_ids.set(client.id, None);
    }
    let was_raw = client.session.borrow().is_raw();
    let pending: Vec<u64> = link
        .owed
        .borrow_mut()
        .drain(..)
        .filter_map(|o| match o {
            Owed::Reply { seq, .. } | Owed::Acked { seq, .. } => Some(seq),
            Owed::Setup | Owed::Wait { .. } => None,
        })
        .chain(held.drain(..).map(|(seq, _)| seq))
        .collect();
    if !pending.is_empty() || was_raw {
        debug!(client = client.id, "dedicated connection ended: {reason}");
    }
    let err = resp::error(&format!("ERR resplica: connection to Redis lost ({reason})"));
    for seq in pending {
        client.fill(seq, err.clone());
    }
    if !retired {
        client.session.borrow_mut().dedicated_lost();
    }
    if was_raw && !retired && !client.closing.get() {
        // A subscriber whose upstream connection died has lost its subscriptions: close it
        // so it reconnects and subscribes again, as it would if Redis itself had restarted.
        client.begin_close();
    }
}

async fn write_loop(client: Rc<Client>, mut wr: ConnWriter) {
    loop {
        let (chunks, total, done) = {
            let mut out = client.out.borrow_mut();
            if out.dead {
                break;
            }
            let mut chunks: Vec<Bytes> = Vec::new();
            let mut total = 0;
            while out.entries.front().is_some_and(|e| e.reply.is_some()) {
                let Some(e) = out.entries.pop_front() else { break };
                out.base_seq += 1;
                if let (Some(r), false) = (e.reply, e.discard) {
                    total += r.len();
                    chunks.push(r);
                }
            }
            let done = out.close_after && out.entries.is_empty();
            (chunks, total, done)
        };
        if chunks.is_empty() {
            if done {
                break;
            }
            client.wake_writer.wait().await;
            continue;
        }
        let write = async {
            if chunks.len() == 1 || total > (1 << 20) {
                for c in chunks {
                    if wr.write_all(c).await.0.is_err() {
                        return false;
                    }
                }
                true
            } else {
                let mut joined = BytesMut::with_capacity(total);
                for c in &chunks {
                    joined.extend_from_slice(c);
                }
                wr.write_all(joined.freeze()).await.0.is_ok()
            }
        };
        client.core.metrics.bytes_out.add(total as u64);
        // A client killed meanwhile (output buffer limit) may never read again: stop waiting.
        let ok = monoio::select! {
            ok = write => ok,
            _ = client.dead_signal.wait() => break,
        };
        {
            let mut out = client.out.borrow_mut();
            out.ready_bytes = out.ready_bytes.saturating_sub(total);
        }
        client.wake_reader.notify();
        if !ok {
            client.kill();
            break;
        }
    }
    let _ = wr.shutdown().await;
}

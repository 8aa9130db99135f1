//! Native mode's shell, on core 0: it polls both Redis (`INFO`), exchanges reports with the
//! peer sidecar, feeds `replication::native::NativeNode`, carries out its commands
//! (`REPLICAOF`, partition merges) and publishes the route for every core
//! (`route::NativeRoute`) and the status text. It decides nothing itself.
//!
//! Peer link (`peer_listen`, RESP): the `peer_auth` handshake (`RS.HELLO`, `RS.PROVE`: the secret never travels) first, then
//! - `RS.NHB <report>`: heartbeat; the reply is the receiver's report;
//! - `RS.NMERGE`: the loser of a partition is about to copy its writes here: hold writes,
//!   let the WAITs in flight answer, and name the keys recorded on this side and those its
//!   clients wrote into the loser's Redis alone (`*3 :overflow *[db key ...] *[db key ...]`);
//! - `RS.NMERGED`: the merge finished; writes flow again.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use monoio::io::AsyncWriteRentExt;
use monoio::net::{ListenerOpts, TcpListener};
use tracing::{info, warn};

use super::conn::Conn;
use super::io::read_more;
use super::upstream::{connect_redis, roundtrip};
use super::Core;
use crate::config::WriteAck;
use crate::replication::native::{Command, NativeConfig, NativeNode, PeerReport, ReplInfo, Side, Unreachable};
use crate::resp::{self, Request, RequestParser};
use crate::route::NativeRoute;

/// Keys copied per round trip during a partition merge.
const MERGE_BATCH: usize = 256;

pub(crate) struct Shell {
    core: Rc<Core>,
    node: RefCell<NativeNode>,
    route: Arc<NativeRoute>,
    started: Instant,
    local_redis: SocketAddr,
    peer_redis: SocketAddr,
    /// `[[peers]] redis` as configured (what `REPLICAOF` is given).
    peer_redis_name: String,
    peer_addr: String,
    peer_id: String,
    secret: String,
    poll: Duration,
    merged_keys: Cell<u64>,
    conflict_keys: Cell<u64>,
    merges_failed: Cell<u64>,
    /// The merge task is running.
    merging: Cell<bool>,
    last_writes: Cell<Option<Side>>,
    /// When the replica last held everything the primary did (status: replica_lag_ms).
    caught_up_at: Cell<u64>,
    /// Whether both Redis hold the same ACL users (status: acl_users).
    acl: RefCell<crate::replication::acl::AclCheck>,
}

impl Shell {
    /// How long an answer (INFO, a heartbeat) may take to count: well within the failover
    /// timeout.
    fn answer_timeout(&self) -> u64 {
        (self.core.shared.cfg.replication.failover_timeout_ms / 3).max(50)
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

impl Shell {
    /// The operator's `RESPLICA TAKEOVER` (see [`NativeNode::take_over`]): the reply.
    pub fn take_over(self: &Rc<Self>) -> bytes::Bytes {
        let now = self.now();
        let decided = self.node.borrow_mut().take_over(now);
        match decided {
            Ok((msg, cmds)) => {
                warn!("{msg}");
                for c in cmds {
                    execute(self, c);
                }
                self.publish(now);
                resp::simple(&msg)
            }
            Err(e) => resp::error(&format!("ERR resplica: takeover refused: {e}")),
        }
    }
}

/// Bind the peer port and start the control loops. Core 0 only.
pub(crate) fn start(core: &Rc<Core>) -> std::io::Result<()> {
    let cfg = &core.shared.cfg;
    let peer = &cfg.peers[0];
    let listener =
        TcpListener::bind_with_config(cfg.node.peer_listen, &ListenerOpts::new().reuse_addr(true).backlog(128))?;
    let route = core.shared.native.clone().ok_or_else(|| std::io::Error::other("native route missing"))?;
    let peer_redis = core.shared.peer_redis.ok_or_else(|| std::io::Error::other("peer Redis address missing"))?;
    let rc = &cfg.replication;
    let node_cfg = NativeConfig {
        id: cfg.node.id.clone(),
        priority: cfg.node.priority,
        peer_id: peer.id.clone(),
        peer_priority: peer.priority.unwrap_or(0),
        failover_timeout_ms: rc.failover_timeout_ms,
        lone_start: rc.lone_start,
        merge_hold_ms: cfg.redis.request_timeout_ms,
    };
    let node = NativeNode::new(node_cfg, 0);
    let poll = Duration::from_millis(node.poll_interval_ms());
    let shell = Rc::new(Shell {
        core: core.clone(),
        node: RefCell::new(node),
        route,
        started: Instant::now(),
        local_redis: cfg.redis.address,
        peer_redis,
        peer_redis_name: peer.redis.clone(),
        peer_addr: peer.address.clone(),
        peer_id: peer.id.clone(),
        secret: rc.secret.clone(),
        poll,
        merged_keys: Cell::new(0),
        conflict_keys: Cell::new(0),
        merges_failed: Cell::new(0),
        merging: Cell::new(false),
        last_writes: Cell::new(None),
        caught_up_at: Cell::new(0),
        acl: RefCell::new(Default::default()),
    });
    *core.native_shell.borrow_mut() = Some(shell.clone());
    monoio::spawn(serve_peer(shell.clone(), listener));
    monoio::spawn(observe_loop(shell.clone(), Side::Local));
    monoio::spawn(observe_loop(shell.clone(), Side::Peer));
    monoio::spawn(heartbeat_loop(shell.clone()));
    monoio::spawn(decide_loop(shell.clone()));
    monoio::spawn(acl_watch(shell.clone()));
    info!(
        node = %cfg.node.id,
        priority = cfg.node.priority,
        peer = %peer.id,
        peer_redis = %peer.redis,
        "native pair: comparing both Redis's replication histories before choosing the primary"
    );
    Ok(())
}

// ---- observing both Redis ----------------------------------------------------------------

/// How often both Redis's ACL users are compared once they first could be.
const ACL_CHECK_INTERVAL: Duration = Duration::from_secs(30);
/// How soon the comparison is tried again when a Redis did not answer.
const ACL_RETRY: Duration = Duration::from_secs(2);

/// Compare both Redis's `ACL LIST` at start and every [`ACL_CHECK_INTERVAL`]: Redis
/// replicates no ACL rule, so a user on one Redis only is refused by the other after a
/// failover. Logged when the finding changes; shown in the status as `acl_users`.
async fn acl_watch(shell: Rc<Shell>) {
    use crate::replication::acl::{compare, AclCheck};
    let list = [vec![b"ACL".to_vec(), b"LIST".to_vec()]];
    loop {
        if shell.core.shared.shutting_down.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let up = &shell.core.shared.upstream;
        let timeout = up.cfg.connect_timeout_ms;
        let mut lists = Vec::new();
        let mut found = None;
        for addr in [shell.local_redis, shell.peer_redis] {
            let reply = match connect_redis(up, addr, 2, 0).await {
                Ok(mut c) => roundtrip(&mut c, &list, timeout).await.ok().and_then(|r| r.into_iter().next()),
                Err(_) => None,
            };
            match reply {
                None => break,
                Some(r) if resp::is_error(&r) => {
                    found = Some(AclCheck::Unknown(format!("ACL LIST: {}", String::from_utf8_lossy(&r).trim())));
                    break;
                }
                Some(r) => lists.push(
                    crate::replication::reply::elements(&r)
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|e| crate::replication::reply::bulk(e))
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .collect::<Vec<_>>(),
                ),
            }
        }
        if let [a, b] = &lists[..] {
            found = Some(compare(a, b));
        }
        let wait = match found {
            // A Redis did not answer (down, failing over): nothing to compare now.
            None => {
                shell.acl.replace(AclCheck::Pending);
                ACL_RETRY
            }
            Some(now) => {
                let before = shell.acl.replace(now.clone());
                if before != now {
                    match &now {
                        AclCheck::Differ(names) => warn!(
                            users = %names.join(","),
                            "the two Redis hold different ACL users (Redis does not replicate them): \
                             after a failover these users get other permissions or WRONGPASS; \
                             run ACL SETUSER on both Redis, or load one aclfile on both"
                        ),
                        AclCheck::Unknown(why) => {
                            warn!("cannot compare the two Redis's ACL users: {why}")
                        }
                        AclCheck::Same if before != AclCheck::Pending => {
                            info!("both Redis hold the same ACL users again")
                        }
                        _ => {}
                    }
                }
                ACL_CHECK_INTERVAL
            }
        };
        monoio::time::sleep(wait).await;
    }
}

fn classify(err: &str) -> Unreachable {
    if err.contains("timed out") || err.contains("did not answer") {
        Unreachable::Timeout
    } else {
        Unreachable::Refused
    }
}

/// Poll one Redis's `INFO` every interval over a connection of its own.
async fn observe_loop(shell: Rc<Shell>, side: Side) {
    let cfg = shell.core.shared.cfg.clone();
    let addr = match side {
        Side::Local => shell.local_redis,
        Side::Peer => shell.peer_redis,
    };
    let timeout = shell.answer_timeout();
    let mut conn: Option<Conn> = None;
    let mut last_err = String::new();
    loop {
        if shell.core.shared.shutting_down.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if conn.is_none() {
            let mut up = shell.core.shared.upstream.clone();
            up.cfg.connect_timeout_ms = timeout;
            match connect_redis(&up, addr, 2, 0).await {
                Ok(mut s) => {
                    if side == Side::Local {
                        // The replication history must outlive a replica's absence (the
                        // default frees it after an hour, changing the replid).
                        let mut setup = vec![vec![
                            b"CONFIG".to_vec(),
                            b"SET".to_vec(),
                            b"repl-backlog-ttl".to_vec(),
                            b"0".to_vec(),
                        ]];
                        setup.push(vec![
                            b"CONFIG".to_vec(),
                            b"SET".to_vec(),
                            b"min-replicas-to-write".to_vec(),
                            cfg.replication.min_replicas_to_write.to_string().into_bytes(),
                        ]);
                        match roundtrip(&mut s, &setup, timeout).await {
                            Ok(replies) => {
                                for r in replies.iter().filter(|r| resp::is_error(r)) {
                                    warn!(
                                        "CONFIG SET on the local Redis refused: {}",
                                        String::from_utf8_lossy(r).trim()
                                    );
                                }
                            }
                            // Unanswered: a late answer would be taken for the next
                            // question's, so this connection is not used.
                            Err(e) => {
                                record(&shell, side, Err(classify(&e)));
                                monoio::time::sleep(shell.poll).await;
                                continue;
                            }
                        }
                    }
                    conn = Some(s);
                }
                Err(e) => {
                    if e != last_err {
                        warn!(redis = %addr, "cannot reach {} Redis: {e}", side_name(side));
                        last_err = e.clone();
                    }
                    record(&shell, side, Err(classify(&e)));
                    monoio::time::sleep(shell.poll).await;
                    continue;
                }
            }
        }
        let Some(s) = conn.as_mut() else { continue };
        // An answer says how the Redis was when asked: stamp it with the time of the question.
        let asked = shell.now();
        let cmd = vec![vec![
            b"INFO".to_vec(),
            b"server".to_vec(),
            b"replication".to_vec(),
            b"keyspace".to_vec(),
            b"stats".to_vec(),
        ]];
        match roundtrip(s, &cmd, timeout).await {
            Ok(replies) => {
                let text = replies.first().map(|r| String::from_utf8_lossy(r).into_owned()).unwrap_or_default();
                match ReplInfo::parse(&text) {
                    Some(info) => {
                        if !last_err.is_empty() {
                            info!(redis = %addr, "{} Redis answers again", side_name(side));
                            last_err.clear();
                        }
                        record_at(&shell, side, asked, Ok(info));
                    }
                    None => {
                        let e = format!("unexpected INFO reply: {}", text.lines().next().unwrap_or(""));
                        if e != last_err {
                            warn!(redis = %addr, "{e}");
                            last_err = e;
                        }
                        record(&shell, side, Err(Unreachable::Timeout));
                        conn = None;
                    }
                }
            }
            Err(e) => {
                if e != last_err {
                    warn!(redis = %addr, "{} Redis stopped answering: {e}", side_name(side));
                    last_err = e.clone();
                }
                record(&shell, side, Err(classify(&e)));
                conn = None;
            }
        }
        monoio::time::sleep(shell.poll).await;
    }
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::Local => "the local",
        Side::Peer => "the peer's",
    }
}

fn record(shell: &Shell, side: Side, seen: Result<ReplInfo, Unreachable>) {
    record_at(shell, side, shell.now(), seen)
}

fn record_at(shell: &Shell, side: Side, now: u64, seen: Result<ReplInfo, Unreachable>) {
    let mut node = shell.node.borrow_mut();
    match side {
        Side::Local => node.on_local(now, seen),
        Side::Peer => node.on_peer_redis(now, seen),
    }
}

// ---- the peer link ---------------------------------------------------------------------

async fn connect_peer(shell: &Shell, timeout: u64) -> Result<Conn, String> {
    let addr = resolve(&shell.peer_addr)?;
    let host = crate::tls::host_of(&shell.peer_addr);
    let tls = shell.core.shared.tls.peer_connect.as_deref().map(|t| (t, host));
    let mut s = Conn::connect(addr, timeout, tls).await?;
    super::handshake::authenticate_to_peer(
        &mut s,
        &shell.core.shared.cfg.node.id,
        &shell.peer_id,
        &shell.secret,
        timeout,
    )
    .await?;
    Ok(s)
}

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    std::net::ToSocketAddrs::to_socket_addrs(addr)
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to nothing"))
}

/// Send our report every interval; the reply is the peer's.
async fn heartbeat_loop(shell: Rc<Shell>) {
    let timeout = shell.answer_timeout();
    let mut conn: Option<Conn> = None;
    let mut last_err = String::new();
    loop {
        if shell.core.shared.shutting_down.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if conn.is_none() {
            match connect_peer(&shell, timeout).await {
                Ok(s) => {
                    info!(peer = %shell.peer_id, "peer link up");
                    last_err.clear();
                    conn = Some(s);
                }
                Err(e) => {
                    if e != last_err {
                        warn!(peer = %shell.peer_id, "peer link down: {e}");
                        last_err = e;
                    }
                    monoio::time::sleep(shell.poll).await;
                    continue;
                }
            }
        }
        let Some(s) = conn.as_mut() else { continue };
        let report = shell.node.borrow().report().encode();
        let cmd = vec![vec![b"RS.NHB".to_vec(), report.into_bytes()]];
        match roundtrip(s, &cmd, timeout).await {
            Ok(r) => {
                if let Some(rep) = r.first().and_then(|r| bulk_text(r)).and_then(|t| PeerReport::decode(&t)) {
                    let now = shell.now();
                    shell.node.borrow_mut().on_peer_report(now, rep);
                }
            }
            Err(e) => {
                warn!(peer = %shell.peer_id, "peer link lost: {e}");
                last_err = e;
                conn = None;
            }
        }
        monoio::time::sleep(shell.poll).await;
    }
}

async fn serve_peer(shell: Rc<Shell>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, from)) => {
                let shell = shell.clone();
                monoio::spawn(async move {
                    let tls = shell.core.shared.tls.peer_accept.clone();
                    match Conn::accept(stream, tls.as_deref(), super::conn::TLS_ACCEPT_TIMEOUT).await {
                        Ok(conn) => serve_peer_conn(shell, conn).await,
                        Err(e) => warn!(%from, "peer link refused: {e}"),
                    }
                });
            }
            Err(e) => {
                warn!("peer accept failed: {e}");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_peer_conn(shell: Rc<Shell>, mut stream: Conn) {
    // Until it authenticates, a peer is held to Redis's limits for unauthenticated clients.
    let mut parser = RequestParser::new(64 << 20);
    parser.set_unauthenticated(true);
    let mut buf = BytesMut::with_capacity(4096);
    let mut authed = false;
    let mut handshake = crate::peer_auth::Acceptor::new(&shell.core.shared.cfg.node.id);
    loop {
        let (res, b) = read_more(&mut stream, buf, 0).await;
        buf = b;
        if !matches!(res, Ok(n) if n > 0) {
            return;
        }
        loop {
            let req: Request = match parser.parse(&mut buf) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    let _ = stream.write_all(resp::error(&format!("ERR {e}"))).await;
                    return;
                }
            };
            let name = req.arg(0).to_ascii_uppercase();
            let reply = if !authed {
                match handshake.accept(shell.secret.as_bytes(), &req) {
                    Ok(step) => {
                        if let crate::peer_auth::Accepted::Authenticated(node) = &step {
                            authed = true;
                            parser.set_unauthenticated(false);
                            tracing::debug!(node = %node, "peer authenticated");
                        }
                        step.reply()
                    }
                    Err(e) => {
                        warn!("refused a peer connection: {e}");
                        let _ = stream.write_all(resp::error(&format!("NOAUTH resplica peer link: {e}"))).await;
                        return;
                    }
                }
            } else {
                match name.as_slice() {
                    b"RS.NHB" if req.len() == 2 => {
                        let text = String::from_utf8_lossy(req.arg(1)).into_owned();
                        if let Some(rep) = PeerReport::decode(&text) {
                            let now = shell.now();
                            shell.node.borrow_mut().on_peer_report(now, rep);
                        }
                        resp::bulk(shell.node.borrow().report().encode().as_bytes())
                    }
                    b"RS.NMERGE" => {
                        let now = shell.now();
                        shell.node.borrow_mut().on_merge_requested(now);
                        shell.publish(now);
                        // Writes sent before the hold finish first: every WAIT in flight
                        // answers within ack_timeout_ms (those unconfirmed are recorded, or
                        // answered with an error now that the route changed), so none is
                        // confirmed later by a replica whose copy the merge rewrote.
                        let ack = shell.core.shared.cfg.replication.ack_timeout_ms;
                        monoio::time::sleep(shell.poll + Duration::from_millis(ack)).await;
                        let (keys, overflow) = shell.route.snapshot_recorded();
                        let into_peer = shell.route.snapshot_peer_written();
                        let mut out = BytesMut::new();
                        resp::push_array_header(&mut out, 3);
                        resp::push_int(&mut out, overflow as i64);
                        for set in [&keys, &into_peer] {
                            resp::push_array_header(&mut out, set.len() * 2);
                            for (db, k) in set.iter() {
                                resp::push_bulk(&mut out, db.to_string().as_bytes());
                                resp::push_bulk(&mut out, k);
                            }
                        }
                        out.freeze()
                    }
                    b"RS.NMERGED" => {
                        shell.node.borrow_mut().on_merge_finished();
                        // What our clients wrote into the peer's Redis alone was just copied
                        // back here with its merge.
                        shell.route.clear_peer_written();
                        shell.publish(shell.now());
                        resp::simple("OK")
                    }
                    _ => resp::error("ERR unknown peer request"),
                }
            };
            if stream.write_all(reply).await.0.is_err() {
                return;
            }
        }
    }
}

// ---- deciding --------------------------------------------------------------------------

impl Shell {
    /// Publish the route for every core and the status text.
    fn publish(&self, now: u64) {
        let node = self.node.borrow();
        let route = node.route(now);
        let (l, p) = node.observed();
        let replica_linked = match route.writes {
            Some(Side::Local) => p.is_some_and(|p| !p.master && p.link_up),
            Some(Side::Peer) => l.is_some_and(|l| !l.master && l.link_up),
            None => false,
        };
        let vet = |side| Some(node.vetted_run(side)).filter(|r| !r.is_empty());
        self.route.approve(vet(Side::Local), vet(Side::Peer));
        self.route.publish(route, replica_linked);
        if route.writes == Some(Side::Peer) && replica_linked {
            // Our Redis replicates the peer's: what our clients wrote there alone reached us.
            self.route.clear_peer_written();
        }
        if self.last_writes.get() != route.writes {
            self.last_writes.set(route.writes);
            match route.writes {
                Some(Side::Local) => info!("writes go to the local Redis ({})", self.local_redis),
                Some(Side::Peer) => info!("writes go to the peer's Redis ({})", self.peer_redis),
                None => info!("writes held: no primary Redis now"),
            }
        }
        let text = self.status_text(&node, now, route, replica_linked);
        drop(node);
        if let Ok(mut s) = self.core.shared.status.lock() {
            *s = text;
        }
    }

    fn status_text(
        &self,
        node: &NativeNode,
        now: u64,
        route: crate::replication::native::Route,
        replica_linked: bool,
    ) -> String {
        use std::fmt::Write;
        let cfg = &self.core.shared.cfg;
        let (l, p) = node.observed();
        let role = match node.primary() {
            Some(Side::Local) => "primary",
            Some(Side::Peer) => "replica",
            None => "forming",
        };
        let primary = match node.primary() {
            Some(Side::Local) => cfg.node.id.as_str(),
            Some(Side::Peer) => self.peer_id.as_str(),
            None => "",
        };
        let mut s = String::new();
        let _ = writeln!(s, "mode:native");
        let _ = writeln!(s, "node:{}", cfg.node.id);
        let _ = writeln!(s, "role:{role}");
        let _ = writeln!(s, "epoch:{}", node.epoch());
        let _ = writeln!(s, "primary:{primary}");
        let _ = writeln!(s, "priority:{}", cfg.node.priority);
        let _ = writeln!(s, "write_ack:{}", if cfg.replication.write_ack == WriteAck::All { "all" } else { "local" });
        let writes = match route.writes {
            Some(Side::Local) => "local",
            Some(Side::Peer) => "peer",
            None => "held",
        };
        let _ = writeln!(s, "writes:{writes}");
        let _ = writeln!(s, "reads_local:{}", route.reads_local as u8);
        let link = if node.peer_heard_within(now, cfg.replication.failover_timeout_ms) { "up" } else { "down" };
        let _ = writeln!(s, "peer:{} link={link}", self.peer_id);
        let _ = writeln!(s, "acl_users:{}", self.acl.borrow().show());
        let show = |name: &str, addr: SocketAddr, i: Option<&ReplInfo>| match i {
            Some(i) => format!(
                "redis:{name} addr={addr} state=up role={} link={} offset={} replid={} keys={}",
                if i.master { "master" } else { "replica" },
                if i.master {
                    "-"
                } else if i.syncing {
                    "syncing"
                } else if i.link_up {
                    "up"
                } else {
                    "down"
                },
                i.offset,
                i.replid,
                i.keys
            ),
            None => format!("redis:{name} addr={addr} state=down"),
        };
        let _ = writeln!(s, "{}", show(&cfg.node.id, self.local_redis, l));
        let _ = writeln!(s, "{}", show(&self.peer_id, self.peer_redis, p));
        let (primary_info, replica_info) = match node.primary() {
            Some(Side::Local) => (l, p),
            Some(Side::Peer) => (p, l),
            None => (None, None),
        };
        let lag = match (primary_info, replica_info) {
            (Some(a), Some(b)) if !b.master => Some(a.offset.saturating_sub(b.offset)),
            _ => None,
        };
        if lag == Some(0) {
            self.caught_up_at.set(now);
        }
        let _ = writeln!(s, "replica_link:{}", if replica_linked { "up" } else { "down" });
        // Served by the primary Redis since it started (Redis's own counters).
        if let Some(pi) = primary_info {
            let _ = writeln!(s, "resyncs_full:{}", pi.sync_full);
            let _ = writeln!(s, "resyncs_partial:{}", pi.sync_partial_ok);
        }
        let _ = writeln!(s, "replica_lag_bytes:{}", lag.map_or("-".to_string(), |l| l.to_string()));
        // How long since the replica last held everything the primary did (as both were
        // polled; up to one poll interval of skew).
        let lag_ms = match lag {
            Some(0) => "0".to_string(),
            Some(_) => now.saturating_sub(self.caught_up_at.get()).to_string(),
            None => "-".into(),
        };
        let _ = writeln!(s, "replica_lag_ms:{lag_ms}");
        let (recorded, overflow) = self.route.recorded_count();
        let _ = writeln!(s, "recording:{}", route.recording as u8);
        let _ = writeln!(s, "recorded_keys:{recorded}{}", if overflow { " overflow=1" } else { "" });
        let _ = writeln!(
            s,
            "acks_on_primary_alone:{}",
            self.route.acks_on_primary_alone.load(std::sync::atomic::Ordering::Relaxed)
        );
        let _ = writeln!(
            s,
            "unconfirmed_writes:{}",
            self.route.unconfirmed_writes.load(std::sync::atomic::Ordering::Relaxed)
        );
        let _ = writeln!(s, "failovers:{}", node.failovers());
        let _ = writeln!(s, "merged_keys:{}", self.merged_keys.get());
        let _ = writeln!(s, "conflict_keys:{}", self.conflict_keys.get());
        let _ = writeln!(s, "merges_failed:{}", self.merges_failed.get());
        s
    }
}

async fn decide_loop(shell: Rc<Shell>) {
    let mut leaving = false;
    loop {
        let now = shell.now();
        if !leaving && shell.core.shared.draining.load(std::sync::atomic::Ordering::Relaxed) {
            // SIGTERM: hand the primary role over while the drain runs.
            leaving = true;
            shell.node.borrow_mut().hand_over(now);
        }
        let (recorded, overflow) = shell.route.recorded_count();
        shell.node.borrow_mut().set_unmerged(recorded > 0 || overflow);
        let cmds = shell.node.borrow_mut().tick(now);
        for e in shell.node.borrow_mut().take_events() {
            info!("{e}");
        }
        for c in cmds {
            execute(&shell, c);
        }
        shell.publish(now);
        if shell.core.shared.shutting_down.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        monoio::time::sleep(shell.poll / 2).await;
    }
}

fn execute(shell: &Rc<Shell>, cmd: Command) {
    match cmd {
        Command::ClearRecorded => shell.route.clear_recorded(),
        Command::Promote(side) => {
            let addr = if side == Side::Local { shell.local_redis } else { shell.peer_redis };
            let shell = shell.clone();
            monoio::spawn(async move {
                let cmd = vec![vec![b"REPLICAOF".to_vec(), b"NO".to_vec(), b"ONE".to_vec()]];
                match run_on(&shell, addr, &cmd).await {
                    Ok(_) => info!(redis = %addr, "REPLICAOF NO ONE: {} Redis is a primary", side_name(side)),
                    Err(e) => warn!(redis = %addr, "REPLICAOF NO ONE failed: {e}"),
                }
            });
        }
        Command::FollowPeer => {
            let shell = shell.clone();
            monoio::spawn(async move {
                if let Err(e) = follow_peer(&shell).await {
                    warn!("REPLICAOF {} failed: {e}", shell.peer_redis_name);
                }
            });
        }
        Command::Merge { overwrite, peer_run } => {
            if shell.merging.replace(true) {
                return;
            }
            let shell = shell.clone();
            monoio::spawn(async move {
                let ok = match merge(&shell, overwrite, &peer_run).await {
                    Ok(()) => true,
                    Err(e) => {
                        warn!("partition merge failed: {e}");
                        shell.merges_failed.set(shell.merges_failed.get() + 1);
                        false
                    }
                };
                let now = shell.now();
                shell.node.borrow_mut().merge_done(now, ok);
                shell.merging.set(false);
            });
        }
    }
}

async fn follow_peer(shell: &Shell) -> Result<(), String> {
    let (host, port) =
        shell.peer_redis_name.rsplit_once(':').ok_or_else(|| format!("{} is not host:port", shell.peer_redis_name))?;
    // The primary asks its replicas for the same credentials the sidecars use (both Redis
    // hold the same users): Redis's own replication authenticates with masteruser/masterauth.
    let redis = &shell.core.shared.cfg.redis;
    let mut cmd = Vec::new();
    if !redis.password.is_empty() {
        cmd.push(vec![b"CONFIG".to_vec(), b"SET".to_vec(), b"masterauth".to_vec(), redis.password.as_bytes().to_vec()]);
        if !redis.username.is_empty() {
            cmd.push(vec![
                b"CONFIG".to_vec(),
                b"SET".to_vec(),
                b"masteruser".to_vec(),
                redis.username.as_bytes().to_vec(),
            ]);
        }
    }
    cmd.push(vec![b"REPLICAOF".to_vec(), host.as_bytes().to_vec(), port.as_bytes().to_vec()]);
    run_on(shell, shell.local_redis, &cmd).await?;
    info!("REPLICAOF {}: the local Redis replicates the peer's", shell.peer_redis_name);
    Ok(())
}

/// Run commands on a Redis over a fresh connection; an error reply is an error.
async fn run_on(shell: &Shell, addr: SocketAddr, cmds: &[Vec<Vec<u8>>]) -> Result<Vec<Bytes>, String> {
    let up = &shell.core.shared.upstream;
    let cfg = &up.cfg;
    let mut s = connect_redis(up, addr, 2, 0).await?;
    let replies = roundtrip(&mut s, cmds, cfg.request_timeout_ms).await?;
    if let Some(e) = replies.iter().find(|r| resp::is_error(r)) {
        return Err(String::from_utf8_lossy(e).trim().to_string());
    }
    Ok(replies)
}

// ---- partition merge --------------------------------------------------------------------

/// Fails unless the Redis on `conn` is the run `want` (its `INFO server` run_id).
async fn same_run(conn: &mut Conn, want: &str, timeout: u64) -> Result<(), String> {
    let info = roundtrip(conn, &[vec![b"INFO".to_vec(), b"server".to_vec()]], timeout).await?;
    let text = String::from_utf8_lossy(info.first().map(|b| &b[..]).unwrap_or(b""));
    let run = crate::replication::reply::info_field(&text, "run_id").unwrap_or("");
    if run != want {
        return Err(format!("the peer's Redis restarted since the merge was decided (run {run}, decided on {want})"));
    }
    Ok(())
}

/// This side lost a partition: copy the keys its clients wrote while cut off into the peer's
/// Redis (those the peer's clients did not write too: there the winner's value stays), then
/// make the local Redis replicate the peer's. Without `overwrite` (the two histories share
/// nothing) a key the peer's Redis already holds keeps its value there (a conflict).
async fn merge(shell: &Rc<Shell>, overwrite: bool, peer_run: &str) -> Result<(), String> {
    let timeout = shell.core.shared.cfg.redis.request_timeout_ms;
    // The winner's sidecar holds its writes and names the keys its clients wrote. Without it
    // (dead, or only paused or cut off) those keys are unknown: no key the winner's Redis
    // holds is replaced (each such key of ours is a counted conflict, never a silent loss of
    // the winner's writes).
    let mut link = match connect_peer(shell, timeout).await {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(
                "partition merge without {}'s sidecar ({e}): keys its Redis holds keep their value there",
                shell.peer_id
            );
            None
        }
    };
    let overwrite = overwrite && link.is_some();
    let (their_overflow, theirs, into_ours) = match link.as_mut() {
        Some(link) => {
            let reply = roundtrip(link, &[vec![b"RS.NMERGE".to_vec()]], timeout).await?;
            parse_merge_reply(reply.first().map(|b| &b[..]).unwrap_or(b""))
                .ok_or_else(|| "the peer's RS.NMERGE answer is malformed".to_string())?
        }
        None => (false, Vec::new(), Vec::new()),
    };
    // Our own writes sent just before the hold get a moment to land.
    monoio::time::sleep(shell.poll).await;
    let (mut mine, overflow) = shell.route.snapshot_recorded();
    if overflow {
        mine = all_keys(shell).await?;
        warn!(keys = mine.len(), "recorded keys overflowed: merging every key of the local Redis");
    }
    if their_overflow {
        warn!("the peer lost track of its partition writes: ours win every conflict");
    }
    let theirs: HashSet<(u32, Bytes)> = theirs.into_iter().collect();
    // Keys the peer's clients wrote into our Redis alone count as ours to copy back.
    let mine: HashSet<(u32, Bytes)> = mine.into_iter().chain(into_ours).collect();
    let mut copy = Vec::new();
    let mut conflicts = 0u64;
    for k in mine {
        if !their_overflow && theirs.contains(&k) {
            conflicts += 1;
        } else {
            copy.push(k);
        }
    }
    let up = &shell.core.shared.upstream;
    let mut src = connect_redis(up, shell.local_redis, 2, 0).await?;
    let mut dst = connect_redis(up, shell.peer_redis, 2, 0).await?;
    // Only into the run the decision was made on (a restarted one may hold anything).
    same_run(&mut dst, peer_run, timeout).await?;
    let mut kept_theirs = 0u64;
    for chunk in copy.chunks(MERGE_BATCH) {
        let mut reads = Vec::with_capacity(chunk.len() * 3);
        for (db, k) in chunk {
            reads.push(crate::command::frames::select_args(*db));
            reads.push(vec![b"DUMP".to_vec(), k.to_vec()]);
            reads.push(vec![b"PEXPIRETIME".to_vec(), k.to_vec()]);
        }
        let got = roundtrip(&mut src, &reads, timeout).await?;
        let mut writes = Vec::with_capacity(chunk.len() * 2);
        for (i, (db, k)) in chunk.iter().enumerate() {
            let dump = bulk_bytes(&got[i * 3 + 1]);
            let at = resp::integer_reply(&got[i * 3 + 2]).unwrap_or(-2);
            writes.push(crate::command::frames::select_args(*db));
            match dump {
                Some(d) if at != -2 => {
                    let mut cmd = vec![b"RESTORE".to_vec(), k.to_vec()];
                    cmd.push(if at > 0 { at.to_string().into_bytes() } else { b"0".to_vec() });
                    cmd.push(d.to_vec());
                    if overwrite {
                        cmd.push(b"REPLACE".to_vec());
                    }
                    if at > 0 {
                        cmd.push(b"ABSTTL".to_vec());
                    }
                    writes.push(cmd);
                }
                // Deleted here: deleted there too, unless the histories share nothing (then
                // the peer's key was never ours to delete).
                _ if overwrite => writes.push(vec![b"DEL".to_vec(), k.to_vec()]),
                _ => {
                    // Our delete loses to their key: a conflict, counted like the others.
                    conflicts += 1;
                    kept_theirs += 1;
                    writes.push(vec![b"PING".to_vec()]);
                }
            }
        }
        let res = roundtrip(&mut dst, &writes, timeout).await?;
        for r in &res {
            if !resp::is_error(r) {
                continue;
            }
            if !overwrite && r.starts_with(b"-BUSYKEY") {
                // The peer's Redis holds the key: its value stays (no common history).
                conflicts += 1;
                kept_theirs += 1;
                continue;
            }
            return Err(format!("copying into the peer's Redis: {}", String::from_utf8_lossy(r).trim()));
        }
    }
    same_run(&mut dst, peer_run, timeout).await?;
    follow_peer(shell).await?;
    shell.merged_keys.set(shell.merged_keys.get() + copy.len() as u64 - kept_theirs);
    shell.conflict_keys.set(shell.conflict_keys.get() + conflicts);
    shell.route.clear_recorded();
    info!(
        merged = copy.len() as u64 - kept_theirs,
        conflicts,
        "partition merge: this side's writes copied into {}'s Redis (conflicting keys keep its value)",
        shell.peer_id
    );
    if let Some(link) = link.as_mut() {
        let _ = roundtrip(link, &[vec![b"RS.NMERGED".to_vec()]], timeout).await;
    }
    Ok(())
}

/// Every key of every database of the local Redis (a merge whose recorded set overflowed).
async fn all_keys(shell: &Shell) -> Result<Vec<(u32, Bytes)>, String> {
    let up = &shell.core.shared.upstream;
    let cfg = &up.cfg;
    let timeout = cfg.request_timeout_ms;
    let mut s = connect_redis(up, shell.local_redis, 2, 0).await?;
    let info = roundtrip(&mut s, &[vec![b"INFO".to_vec(), b"keyspace".to_vec()]], timeout).await?;
    let text = info.first().map(|r| String::from_utf8_lossy(r).into_owned()).unwrap_or_default();
    let dbs: Vec<u32> = text
        .lines()
        .filter_map(|l| l.strip_prefix("db").and_then(|r| r.split(':').next()).and_then(|n| n.parse().ok()))
        .collect();
    let mut out = Vec::new();
    for db in dbs {
        roundtrip(&mut s, &[crate::command::frames::select_args(db)], timeout).await?;
        let mut cursor = b"0".to_vec();
        loop {
            let r = roundtrip(
                &mut s,
                &[vec![b"SCAN".to_vec(), cursor.clone(), b"COUNT".to_vec(), b"1000".to_vec()]],
                timeout,
            )
            .await?;
            let (next, keys) = parse_scan(r.first().map(|b| &b[..]).unwrap_or(b"")).ok_or("bad SCAN reply")?;
            out.extend(keys.into_iter().map(|k| (db, k)));
            if next == b"0" {
                break;
            }
            cursor = next;
        }
    }
    Ok(out)
}

// ---- reply decoding ----------------------------------------------------------------------

/// `$n\r\n<bytes>\r\n` → the bytes; `None` for a null or anything else.
fn bulk_bytes(reply: &[u8]) -> Option<&[u8]> {
    let (v, _) = take_bulk(reply)?;
    v
}

fn bulk_text(reply: &[u8]) -> Option<String> {
    bulk_bytes(reply).map(|b| String::from_utf8_lossy(b).into_owned())
}

/// One bulk string at the start of `buf`: (its bytes or None for a null, the rest).
fn take_bulk(buf: &[u8]) -> Option<(Option<&[u8]>, &[u8])> {
    let rest = buf.strip_prefix(b"$")?;
    let eol = memchr::memchr(b'\r', rest)?;
    let n = resp::parse_int(&rest[..eol])?;
    let body = rest.get(eol + 2..)?;
    if n < 0 {
        return Some((None, body));
    }
    let n = n as usize;
    let v = body.get(..n)?;
    let after = body.get(n + 2..)?;
    Some((Some(v), after))
}

fn take_header(buf: &[u8], mark: u8) -> Option<(i64, &[u8])> {
    let rest = buf.strip_prefix(&[mark])?;
    let eol = memchr::memchr(b'\r', rest)?;
    let n = resp::parse_int(&rest[..eol])?;
    Some((n, rest.get(eol + 2..)?))
}

/// `*3 :overflow *[db key ...] *[db key ...]`: the keys the winner recorded, and the keys
/// its clients wrote into the loser's Redis alone.
type MergeReply = (bool, DbKeys, DbKeys);

fn parse_merge_reply(buf: &[u8]) -> Option<MergeReply> {
    let (n, rest) = take_header(buf, b'*')?;
    if n != 3 {
        return None;
    }
    let (overflow, rest) = take_header(rest, b':')?;
    let (recorded, rest) = take_keys(rest)?;
    let (into_peer, _) = take_keys(rest)?;
    Some((overflow != 0, recorded, into_peer))
}

/// `(database, key)` pairs.
type DbKeys = Vec<(u32, Bytes)>;

/// `*[db key ...]` → the pairs, and the rest.
fn take_keys(buf: &[u8]) -> Option<(DbKeys, &[u8])> {
    let (count, mut rest) = take_header(buf, b'*')?;
    let mut keys = Vec::with_capacity(count.max(0) as usize / 2);
    for _ in 0..count.max(0) / 2 {
        let (db, r) = take_bulk(rest)?;
        let (key, r) = take_bulk(r)?;
        let db: u32 = std::str::from_utf8(db?).ok()?.parse().ok()?;
        keys.push((db, Bytes::copy_from_slice(key?)));
        rest = r;
    }
    Some((keys, rest))
}

/// `*2 $cursor *[key ...]`.
fn parse_scan(buf: &[u8]) -> Option<(Vec<u8>, Vec<Bytes>)> {
    let (n, rest) = take_header(buf, b'*')?;
    if n != 2 {
        return None;
    }
    let (cursor, rest) = take_bulk(rest)?;
    let (count, mut rest) = take_header(rest, b'*')?;
    let mut keys = Vec::new();
    for _ in 0..count.max(0) {
        let (k, r) = take_bulk(rest)?;
        keys.push(Bytes::copy_from_slice(k?));
        rest = r;
    }
    Some((cursor?.to_vec(), keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_merge_and_scan_replies() {
        let mut out = BytesMut::new();
        resp::push_array_header(&mut out, 3);
        resp::push_int(&mut out, 1);
        resp::push_array_header(&mut out, 4);
        for x in [b"0".as_slice(), b"k1", b"3", b"k\r\n2"] {
            resp::push_bulk(&mut out, x);
        }
        resp::push_array_header(&mut out, 2);
        resp::push_bulk(&mut out, b"1");
        resp::push_bulk(&mut out, b"p");
        let (overflow, keys, into) = parse_merge_reply(&out).unwrap();
        assert!(overflow);
        assert_eq!(keys, vec![(0, Bytes::from_static(b"k1")), (3, Bytes::from_static(b"k\r\n2"))]);
        assert_eq!(into, vec![(1, Bytes::from_static(b"p"))]);
        assert!(parse_merge_reply(b"*3\r\n:0\r\n*2\r\n$1\r\nx\r\n$1\r\nk\r\n*0\r\n").is_none(), "db must be a number");
        let scan = b"*2\r\n$2\r\n17\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n";
        let (cursor, keys) = parse_scan(scan).unwrap();
        assert_eq!((cursor.as_slice(), keys.len()), (b"17".as_slice(), 2));
        assert_eq!(bulk_bytes(b"$-1\r\n"), None);
        assert_eq!(bulk_bytes(b"$3\r\nabc\r\n"), Some(b"abc".as_slice()));
    }
}

//! One client connection's state and the decision, for each request, of what happens to it:
//! answered by the proxy itself (PING, AUTH, SELECT, HELLO, CLIENT SETNAME, ...), refused,
//! answered by the shell from all cores' clients (CLIENT LIST/KILL), forwarded on a shared
//! pipelined upstream connection ("lane"), or forwarded on the client's own dedicated
//! upstream connection (transactions, blocking commands, pub/sub, MONITOR, client tracking,
//! SCRIPT KILL).
//!
//! It also keeps the client's ordering promise (DESIGN.md invariant 2) across lanes: writes go
//! to their slot's sequencer lane when slot sequencing is on (to the pair's writer, with
//! MULTI blocks, WATCH and blocking pops, when the node has peers), reads to the receiving
//! core's lane, and a command that could overtake one of the client's own in-flight commands on
//! another connection is held back (`Action::Wait`) until that one is answered.
//!
//! No I/O and no clock: the runtime shell feeds requests in and reports completions.

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};

use crate::command::{self, CommandDef};
use crate::replication::writer_request::WriterRequest;
use crate::resp::{self, parse_int, Request};
use crate::slot::key_slot;

/// Which upstream connection a command travels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// The shared pipelined connection owned by this core index (in the client's protocol).
    Shared(usize),
    /// The client's own connection.
    Dedicated,
    /// The pair's writer: this node's sequencer when it is the writer, else the peer link
    /// to the writer (reached through core 0).
    Writer,
    /// Native mode: this core's shared connection to the peer's Redis (the primary when the
    /// local Redis is its replica).
    PeerShared,
}

/// How a forwarded command uses the dedicated connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DedicatedUse {
    /// Not on the dedicated connection.
    No,
    /// One reply per request, matched in order (transactions, blocking commands).
    Counted { blocking: bool },
    /// Replies and pushes go straight to the client (pub/sub, MONITOR, client tracking):
    /// the connection stays this client's until it disconnects or sends RESET.
    Raw,
}

/// What a forwarded command may conflict with, for the ordering rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Touches the keys of one slot only.
    Slot(u16),
    /// No keys, keys in several slots, or unknown: conflicts with everything.
    All,
}

/// Bookkeeping the shell hands back in `completed` when the reply arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    pub lane: Lane,
    pub scope: Scope,
}

/// A command to send upstream.
#[derive(Debug)]
pub struct Forward {
    pub lane: Lane,
    pub tag: Tag,
    pub frame: Bytes,
    pub db: u32,
    pub dedicated: DedicatedUse,
    /// The client asked not to get this reply (CLIENT REPLY OFF/SKIP).
    pub discard: bool,
    /// The command does not depend on the database (SCRIPT KILL, FUNCTION KILL): a dedicated
    /// connection opened for it is left in database 0, because Redis refuses SELECT while a
    /// script is running, which is exactly when these are sent.
    pub any_db: bool,
    /// Redis runs it even while a script is busy (MULTI, WATCH, ...): a SELECT sent in front
    /// of it could fail (BUSY) while it succeeds, leaving it in the wrong database.
    pub allow_busy: bool,
    /// It may change data (native mode, `write_ack = "all"`: its batch ends with WAIT). On
    /// the dedicated connection: its reply waits for the replica (EXEC of a block that wrote,
    /// a write outside MULTI), never set for a command Redis only queues.
    pub write: bool,
    /// On [`Lane::Writer`] (mirror mode): the request as the writer's sequencer takes it,
    /// parsed and classified here (`frame` is empty for a MULTI … EXEC block).
    pub writer: Option<WriterRequest>,
}

/// What CLIENT LIST shows of a client; published by the shell to a registry all cores read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub id: u64,
    pub core: usize,
    pub peer: String,
    pub local: String,
    pub name: Option<Bytes>,
    /// `CLIENT SETINFO LIB-NAME` / `LIB-VER` (empty when unset).
    pub lib: (Bytes, Bytes),
    /// The Redis user it authenticated as.
    pub user: Bytes,
    pub db: u32,
    pub proto: u8,
    /// Redis's CLIENT LIST flags: `N` normal, `x` in MULTI, `P` pub/sub or MONITOR.
    pub flags: char,
    /// The last command (`get`, `client|info`); in the registry, the last one that changed
    /// what CLIENT LIST shows (updating it for every command would lock per command).
    pub cmd: (&'static str, Option<&'static str>),
}

impl ClientInfo {
    /// One line of CLIENT LIST / CLIENT INFO, in Redis's format.
    pub fn line(&self) -> String {
        let name = self.name.as_ref().map(|n| String::from_utf8_lossy(n).into_owned()).unwrap_or_default();
        format!(
            "id={} addr={} laddr={} fd=-1 name={} age=0 idle=0 flags={} db={} sub=0 psub=0 ssub=0 multi={} qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem=0 tot-mem=0 events=r cmd={}{}{} user={} redir=-1 resp={} lib-name={} lib-ver={}\n",
            self.id,
            self.peer,
            self.local,
            name,
            self.flags,
            self.db,
            if self.flags == 'x' { 0 } else { -1 },
            self.cmd.0,
            if self.cmd.1.is_some() { "|" } else { "" },
            self.cmd.1.unwrap_or(""),
            String::from_utf8_lossy(&self.user),
            self.proto,
            String::from_utf8_lossy(&self.lib.0),
            String::from_utf8_lossy(&self.lib.1)
        )
    }
}

/// Which clients a CLIENT KILL names (Redis's filters; all given must match).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KillFilter {
    pub id: Option<u64>,
    pub addr: Option<String>,
    pub laddr: Option<String>,
    /// `normal` or `pubsub` (`master`/`replica` match nobody behind a proxy).
    pub kind: Option<String>,
    /// The Redis user the client authenticated as.
    pub user: Option<String>,
    pub skip_me: bool,
    /// The old `CLIENT KILL addr:port` form: answers +OK or an error instead of a count.
    pub legacy: bool,
}

impl KillFilter {
    /// Whether `c` matches (the caller applies `skip_me`).
    pub fn matches(&self, c: &ClientInfo) -> bool {
        self.id.is_none_or(|id| id == c.id)
            && self.addr.as_ref().is_none_or(|a| *a == c.peer)
            && self.laddr.as_ref().is_none_or(|a| *a == c.local)
            && self.user.as_ref().is_none_or(|u| u.as_bytes() == &c.user[..])
            && self.kind.as_ref().is_none_or(|k| match k.as_str() {
                "normal" => c.flags != 'P',
                "pubsub" => c.flags == 'P',
                _ => false,
            })
    }
}

/// Commands about other clients, which the shell answers from the registry of all cores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientQuery {
    /// CLIENT LIST [TYPE t] [ID id ...].
    List { ids: Option<Vec<u64>>, kind: Option<String> },
    /// CLIENT KILL ...
    Kill(KillFilter),
}

/// The decision for one request.
#[derive(Debug)]
pub enum Action {
    /// Answer with these bytes (in order after earlier replies).
    Reply(Bytes),
    /// Nothing to send (empty request, or CLIENT REPLY OFF).
    Nothing,
    /// Answer, then close the connection (QUIT).
    Close(Bytes),
    /// Answer; the dedicated connection, if any, must be dropped (RESET).
    Reset(Bytes),
    /// Send upstream.
    Forward(Forward),
    /// Cannot go yet without overtaking an in-flight command: offer it again after the next
    /// completion.
    Wait,
    /// Native mode: no primary Redis right now (the pair is forming, failing over or
    /// merging): offer it again shortly, up to `request_timeout_ms`, then answer `TRYAGAIN`.
    Hold,
    /// CLIENT LIST / CLIENT KILL: answered by the shell from the registry of all clients.
    Clients(ClientQuery),
    /// RESPLICA STATUS: answered by the shell from the replication status.
    Status,
    /// `AUTH user pass` (or `HELLO … AUTH user pass`) for a Redis ACL user other than
    /// `default`: Redis checks the credentials (the shell opens a connection as that user).
    /// On success the shell calls [`Session::acl_verified`] and, for `hello`, offers the
    /// request again; on failure it answers Redis's error.
    Auth { user: AclUser, hello: bool },
}

/// A Redis ACL user a client authenticated as: its commands go over connections
/// authenticated as that user, so that Redis applies its permissions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AclUser {
    pub name: Bytes,
    pub pass: Bytes,
}

/// The refused commands, resolved once to table entries so the per-request check is a
/// pointer comparison.
#[derive(Debug, Clone, Default)]
pub struct Refused {
    known: Vec<&'static CommandDef>,
    unknown: Vec<String>,
}

impl Refused {
    /// From command names (any case).
    pub fn new<S: AsRef<str>>(names: &[S]) -> Refused {
        let mut r = Refused::default();
        for n in names {
            let lower = n.as_ref().to_ascii_lowercase();
            match command::lookup_command(lower.as_bytes()) {
                Some(d) => r.known.push(d),
                None => r.unknown.push(lower),
            }
        }
        r
    }

    /// Whether the command (`top`: its table entry; `name`: lower-case name) is refused.
    pub fn contains(&self, top: Option<&'static CommandDef>, name: &[u8]) -> bool {
        match top {
            Some(d) => self.known.iter().any(|k| std::ptr::eq(*k, d)),
            None => self.unknown.iter().any(|u| u.as_bytes() == name),
        }
    }
}

/// Facts about the environment a session needs, shared by all sessions of a process.
#[derive(Debug, Clone)]
pub struct SessionEnv {
    /// `[client] password`; empty = no AUTH needed.
    pub password: String,
    /// Refused commands, by name (lower case).
    pub refused: Refused,
    /// Runtime threads (sequencer cores).
    pub threads: usize,
    /// Whether writes go to their slot's sequencer core.
    pub slot_sequencing: bool,
    /// Redis version reported by HELLO.
    pub redis_version: String,
    /// Number of databases of the upstream Redis.
    pub databases: u32,
    /// Proxy client id → Redis's id of that client's dedicated connection, for commands that
    /// name another client (`CLIENT TRACKING ... REDIRECT id`, `CLIENT UNBLOCK id`).
    pub upstream_ids: UpstreamIds,
    /// Part of a pair (or group): writes go to the writer, transactions and blocking
    /// commands are run by the writer's sequencer.
    pub pair: bool,
    /// Pair mode: whether the local Redis is known to be in sync (else reads go to the
    /// writer too; invariant 5). Set by the replication shell.
    pub local_in_sync: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Native mode: where writes and reads go, published by the control plane.
    pub native: Option<std::sync::Arc<crate::route::NativeRoute>>,
    /// A pair with `write_ack = "local"`: a client that wrote through the other node reads
    /// there from then on (this node's Redis may not have the write yet).
    pub write_ack_local: bool,
}

/// Shared by all cores; touched when a dedicated connection opens or closes and by the rare
/// commands that name a client id, never on the data path.
#[derive(Debug, Clone, Default)]
pub struct UpstreamIds(std::sync::Arc<std::sync::Mutex<HashMap<u64, u64>>>);

/// An id no Redis connection has, for proxy ids that have no dedicated connection: Redis
/// then answers as for any unknown client.
const NO_SUCH_CLIENT: u64 = i64::MAX as u64;

impl UpstreamIds {
    /// Record (or, with `None`, forget) the upstream id of a client's dedicated connection.
    pub fn set(&self, client: u64, upstream: Option<u64>) {
        if let Ok(mut m) = self.0.lock() {
            match upstream {
                Some(u) => m.insert(client, u),
                None => m.remove(&client),
            };
        }
    }

    fn translate(&self, client: u64) -> u64 {
        self.0.lock().ok().and_then(|m| m.get(&client).copied()).unwrap_or(NO_SUCH_CLIENT)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyMode {
    On,
    Off,
    /// Skip the next command's reply.
    Skip,
}

/// Per-client state.
#[derive(Debug)]
pub struct Session {
    pub id: u64,
    pub core: usize,
    pub db: u32,
    pub proto: u8,
    /// `CLIENT SETINFO` LIB-NAME and LIB-VER.
    pub lib: (Bytes, Bytes),
    pub name: Option<Bytes>,
    pub authed: bool,
    /// The Redis ACL user this client authenticated as (`None`: the proxy's own upstream
    /// identity, shown as `default`).
    pub user: Option<AclUser>,
    /// Credentials Redis just accepted for a `HELLO … AUTH` offered again.
    verified: Option<AclUser>,
    pub peer: String,
    pub local: String,
    reply_mode: ReplyMode,
    in_multi: bool,
    watching: bool,
    raw: bool,
    /// CLIENT TRACKING was turned on: invalidations arrive on the dedicated connection, so
    /// every forwarded command stays there (replies still matched one per request).
    tracking: bool,
    /// The command being handled (top-level name, subcommand name).
    cmd: (&'static str, Option<&'static str>),
    /// The top-level command of the request being decided (`None`: unknown), for the
    /// shell's per-command metrics: one table lookup per request.
    current: Option<&'static command::CommandDef>,
    inflight: Inflight,
    /// Pair mode, inside MULTI: the queued commands (sent as one block at EXEC).
    queued: Vec<Request>,
    /// Pair mode: a command was refused while queuing (EXEC then aborts, like Redis).
    queue_failed: bool,
    /// Pair mode: the database the last queued SELECT moves the client to at EXEC.
    queued_db: Option<u32>,
    /// Pair mode: WATCH is held by the writer's sequencer.
    pair_watching: bool,
    /// Pair mode with `write_ack = "local"`: this client wrote, so its reads go to the
    /// primary (native) or the writer (mirror), where its writes are known to be.
    read_at_primary: bool,
    /// Inside MULTI on the dedicated connection: a queued command writes.
    multi_wrote: bool,
}

/// Commands sent and not yet answered, by lane and by slot.
#[derive(Debug, Default)]
struct Inflight {
    /// (lane, count) for every lane with commands in flight.
    lanes: Vec<(Lane, u32)>,
    /// Slot → (lane, count); only slot sequencing produces `Scope::Slot`.
    slots: crate::slot::IdMap<u16, (Lane, u32)>,
    /// Commands of scope `All` in flight: (lane, count).
    all: Option<(Lane, u32)>,
}

impl Inflight {
    fn only_lane(&self) -> Option<Lane> {
        match self.lanes.as_slice() {
            [(l, _)] => Some(*l),
            _ => None,
        }
    }

    fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    /// True when nothing is in flight on a lane other than `lane`.
    fn only_on(&self, lane: Lane) -> bool {
        self.lanes.iter().all(|(l, _)| *l == lane)
    }

    fn add(&mut self, tag: Tag) {
        match self.lanes.iter_mut().find(|(l, _)| *l == tag.lane) {
            Some((_, n)) => *n += 1,
            None => self.lanes.push((tag.lane, 1)),
        }
        match tag.scope {
            Scope::All => match &mut self.all {
                Some((_, n)) => *n += 1,
                None => self.all = Some((tag.lane, 1)),
            },
            Scope::Slot(s) => self.slots.entry(s).or_insert((tag.lane, 0)).1 += 1,
        }
    }

    fn remove(&mut self, tag: Tag) {
        if let Some(i) = self.lanes.iter().position(|(l, _)| *l == tag.lane) {
            self.lanes[i].1 -= 1;
            if self.lanes[i].1 == 0 {
                self.lanes.swap_remove(i);
            }
        }
        match tag.scope {
            Scope::All => {
                if let Some((_, n)) = &mut self.all {
                    *n -= 1;
                    if *n == 0 {
                        self.all = None;
                    }
                }
            }
            Scope::Slot(s) => {
                if let Some(e) = self.slots.get_mut(&s) {
                    e.1 -= 1;
                    if e.1 == 0 {
                        self.slots.remove(&s);
                    }
                }
            }
        }
    }
}

const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";

/// Mirror mode applies writes through the sequencer's own connections: a Redis ACL user's
/// permissions could not be applied to them.
const ACL_USERS_IN_MIRROR: &str =
    "ERR resplica: Redis ACL users are served in single-node and native mode, not in mirror mode (AUTH as the default user)";

/// Whether a `HELLO` carries `AUTH`.
fn hello_has_auth(req: &Request) -> bool {
    (2..req.len()).any(|i| req.arg(i).eq_ignore_ascii_case(b"auth"))
}

/// `HELLO … AUTH user pass` naming a Redis ACL user other than `default`.
fn hello_acl_user(req: &Request) -> Option<AclUser> {
    let mut i = 2;
    while i < req.len() {
        let opt = req.arg(i).to_ascii_lowercase();
        if opt == b"auth" && i + 2 < req.len() {
            if req.arg(i + 1) == b"default" {
                return None;
            }
            return Some(AclUser { name: req.arg_bytes(i + 1), pass: req.arg_bytes(i + 2) });
        }
        i += if opt == b"setname" { 2 } else { 1 };
    }
    None
}

fn wrong_args(name: &str) -> Bytes {
    resp::error(&format!("ERR wrong number of arguments for '{name}' command"))
}

impl Session {
    /// A new client, authenticated already when no password is configured.
    pub fn new(id: u64, core: usize, env: &SessionEnv, peer: String, local: String) -> Session {
        Session {
            id,
            core,
            db: 0,
            proto: 2,
            name: None,
            lib: (Bytes::new(), Bytes::new()),
            user: None,
            verified: None,
            authed: env.password.is_empty(),
            peer,
            local,
            reply_mode: ReplyMode::On,
            in_multi: false,
            watching: false,
            raw: false,
            tracking: false,
            cmd: ("NULL", None),
            current: None,
            inflight: Inflight::default(),
            queued: Vec::new(),
            queue_failed: false,
            queued_db: None,
            pair_watching: false,
            read_at_primary: false,
            multi_wrote: false,
        }
    }

    /// Whether the client is bound to its dedicated connection (MULTI, WATCH, pub/sub, ...).
    pub fn in_dedicated_state(&self) -> bool {
        self.in_multi || self.watching || self.raw || self.tracking
    }

    /// Whether the client is in pub/sub or MONITOR mode (output not driven by requests).
    pub fn is_raw(&self) -> bool {
        self.raw
    }

    /// A reply for a command with this tag arrived (or the command failed).
    pub fn completed(&mut self, tag: Tag) {
        self.inflight.remove(tag);
    }

    /// The dedicated connection is gone (Redis closed it): leave the states that needed it.
    pub fn dedicated_lost(&mut self) {
        self.in_multi = false;
        self.watching = false;
        self.raw = false;
        self.tracking = false;
    }

    /// Decide what to do with one request. Changes state only when the answer is not `Wait`
    /// or `Hold`.
    /// The top-level command of the last request `on_request` saw (`None`: unknown).
    pub fn current_command(&self) -> Option<&'static command::CommandDef> {
        self.current
    }

    pub fn on_request(&mut self, req: &Request, env: &SessionEnv) -> Action {
        let action = self.decide(req, env);
        let Action::Forward(f) = &action else { return action };
        if env.write_ack_local && f.write && matches!(f.lane, Lane::Writer | Lane::PeerShared) {
            // A pair with write_ack = "local": the write is acknowledged once the other
            // node's Redis (the writer's, the primary) has it; this node's may not yet. The
            // client's reads go there from now on, so that they see its own writes (N2, M2).
            self.read_at_primary = true;
        }
        if let Some(n) = &env.native {
            // Native mode, possibly cut off from the other side: remember what this side's
            // clients write where, for the partition merge (N6).
            if f.lane == Lane::PeerShared {
                if f.write {
                    n.forget_request(f.db, req);
                }
            } else if n.recording() && command::is_write(command::lookup(req)) {
                n.record_request(f.db, req);
            }
        }
        action
    }

    fn decide(&mut self, req: &Request, env: &SessionEnv) -> Action {
        self.current = None;
        if req.is_empty() {
            return Action::Nothing;
        }
        let name_raw = req.arg(0);
        let mut lname = [0u8; 24];
        let name: &[u8] = if name_raw.len() <= lname.len() {
            for (d, s) in lname.iter_mut().zip(name_raw) {
                *d = s.to_ascii_lowercase();
            }
            &lname[..name_raw.len()]
        } else {
            name_raw
        };
        let (top, def) = match command::lookup_with_parent(req) {
            Some((t, d)) => (Some(t), Some(d)),
            None => (None, None),
        };
        self.current = top;
        if let Some(t) = top {
            self.cmd = (t.name, def.filter(|d| !std::ptr::eq(*d, t)).map(|d| d.name));
        }

        if !self.authed && !matches!(name, b"auth" | b"hello" | b"quit" | b"reset") {
            return self.local_reply(resp::error("NOAUTH Authentication required."));
        }
        if env.refused.contains(top, name) {
            let shown = String::from_utf8_lossy(name_raw);
            return self.local_reply(resp::error(&format!(
                "ERR command '{shown}' is not allowed through resplica (see [client] refuse_commands)"
            )));
        }
        match name {
            b"quit" => return Action::Close(resp::simple("OK")),
            b"reset" => {
                self.reset(env);
                return Action::Reset(resp::simple("RESET"));
            }
            _ => {}
        }

        // Who the client is changes only between requests: never while its dedicated
        // connection holds state of the current identity (a transaction, WATCH, tracking),
        // and only once its earlier requests are answered (they run as the identity they were
        // sent as; the next ones may go over another connection).
        let identity_change = name == b"auth" || (name == b"hello" && hello_has_auth(req));
        if identity_change && !self.raw {
            if self.in_multi || self.watching || self.tracking {
                return self.local_reply(resp::error(
                    "ERR resplica: AUTH inside a transaction, WATCH or client tracking is not supported (EXEC, DISCARD, UNWATCH or CLIENT TRACKING off first)",
                ));
            }
            if !self.inflight.is_empty() {
                return Action::Wait;
            }
        }
        if name == b"config" && sets_requirepass(req) {
            return self.local_reply(resp::error(
                "ERR resplica: CONFIG SET requirepass would lock resplica out of its own Redis; \
                 set [redis] password (resplica's credentials) and [client] password (clients' AUTH) instead",
            ));
        }
        // Commands naming another client by id: ours → the Redis id of its connection.
        let translated;
        let req = match translate_client_ids(name, req, &env.upstream_ids) {
            Some(r) => {
                translated = r;
                &translated
            }
            None => req,
        };

        if self.raw {
            // Pub/sub or MONITOR: the dedicated connection carries everything from now on,
            // except (pair mode, RESP3) writes, which must go through the writer.
            if env.pair && command::replicates(def, req) && !command::facts::is_pubsub_mode(name) {
                return self.forward(req, Lane::Writer, Scope::All, DedicatedUse::No, def);
            }
            if name == b"select" {
                if let Some(db) = req.len().eq(&2).then(|| parse_int(req.arg(1))).flatten() {
                    self.db = db.max(0) as u32;
                }
            }
            return self.forward(req, Lane::Dedicated, Scope::All, DedicatedUse::Raw, def);
        }
        if env.pair {
            if let Some(action) = self.pair_transaction(name, req, def) {
                return action;
            }
        } else if self.in_multi || self.watching {
            return self.in_transaction(name, req, def);
        }

        if name == b"resplica" {
            return if req.len() == 2 && req.arg(1).eq_ignore_ascii_case(b"status") {
                Action::Status
            } else {
                self.local_reply(resp::error("ERR unknown RESPLICA subcommand (try RESPLICA STATUS)"))
            };
        }
        if let Some(action) = self.local_command(name, req, env) {
            return action;
        }

        // Commands that need connection state upstream.
        let flags = def.map(|d| d.flags).unwrap_or(0);
        let pubsub_mode = command::facts::is_pubsub_mode(name);
        let needs_primary = pubsub_mode
            || command::facts::blocks(req, flags)
            || name == b"multi"
            || name == b"watch"
            || (name == b"client" && req.len() > 1 && req.arg(1).eq_ignore_ascii_case(b"tracking"));
        if needs_primary && !self.in_dedicated_state() {
            if let Some(n) = &env.native {
                if n.writes() == crate::route::WriteTarget::Hold {
                    return Action::Hold;
                }
            }
        }
        if pubsub_mode {
            if !self.inflight.only_on(Lane::Dedicated) {
                return Action::Wait;
            }
            self.raw = true;
            return self.forward(req, Lane::Dedicated, Scope::All, DedicatedUse::Raw, def);
        }
        // SCRIPT KILL / FUNCTION KILL are sent while a script holds Redis; on a shared lane
        // they would queue behind that very script (if it came through the same lane) and
        // never reach Redis: they get a connection of their own, like Redis's own clients.
        if is_script_kill(name, req) {
            if !self.inflight.only_on(Lane::Dedicated) {
                return Action::Wait;
            }
            let mut action =
                self.forward(req, Lane::Dedicated, Scope::All, DedicatedUse::Counted { blocking: false }, def);
            if let Action::Forward(f) = &mut action {
                f.any_db = true;
            }
            return action;
        }
        let blocking = command::facts::blocks(req, flags);
        if env.pair && blocking && command::is_write(def) {
            // The writer's sequencer serves it: it sees every write to the key.
            if !self.inflight.only_on(Lane::Writer) {
                return Action::Wait;
            }
            return self.forward(req, Lane::Writer, Scope::All, DedicatedUse::No, def);
        }
        let starts_tracking = name == b"client" && req.len() > 1 && req.arg(1).eq_ignore_ascii_case(b"tracking");
        if env.pair && self.tracking && command::replicates(def, req) {
            // Tracking keeps reads on the dedicated connection (where Redis records what the
            // client read); writes still go through the writer.
            if !self.inflight.only_on(Lane::Writer) {
                return Action::Wait;
            }
            return self.forward(req, Lane::Writer, Scope::All, DedicatedUse::No, def);
        }
        if blocking || self.tracking || starts_tracking || name == b"multi" || name == b"watch" {
            if !self.inflight.only_on(Lane::Dedicated) {
                return Action::Wait;
            }
            match name {
                b"multi" => self.in_multi = true,
                b"watch" => self.watching = true,
                _ if starts_tracking => self.tracking = true,
                _ => {}
            }
            return self.forward(req, Lane::Dedicated, Scope::All, DedicatedUse::Counted { blocking }, def);
        }

        self.route(req, def, env)
    }

    /// Route an ordinary command to a shared lane, holding it back if it could overtake one
    /// of this client's in-flight commands.
    fn route(&mut self, req: &Request, def: Option<&'static CommandDef>, env: &SessionEnv) -> Action {
        if let Some(n) = &env.native {
            return self.route_native(req, def, n);
        }
        let write = if env.pair { command::replicates(def, req) } else { command::is_write(def) };
        // A client that WATCHes reads at the writer: what it reads is then at least as new as
        // its watch point whatever `write_ack` is.
        let local = if env.pair
            && (self.pair_watching
                || self.read_at_primary
                || !env.local_in_sync.load(std::sync::atomic::Ordering::Relaxed))
        {
            Lane::Writer
        } else {
            Lane::Shared(self.core)
        };
        let write_lane = |s: u16| if env.pair { Lane::Writer } else { Lane::Shared(s as usize % env.threads) };
        if !env.pair && (!env.slot_sequencing || env.threads <= 1) {
            // One lane per client: only the dedicated connection can be overtaken.
            if !self.inflight.only_on(local) {
                return Action::Wait;
            }
            return self.forward(req, local, Scope::All, DedicatedUse::No, def);
        }
        let scope = match def {
            Some(d) => single_slot(d, req),
            None => Scope::All,
        };
        let lane = match (scope, write) {
            (Scope::Slot(s), true) => {
                let lane = write_lane(s);
                let slot_ok = self.inflight.slots.get(&s).is_none_or(|(l, _)| *l == lane);
                let all_ok = self.inflight.all.is_none_or(|(l, _)| l == lane);
                let ded_ok = !self.inflight.lanes.iter().any(|(l, _)| *l == Lane::Dedicated);
                if !(slot_ok && all_ok && ded_ok) {
                    return Action::Wait;
                }
                lane
            }
            (Scope::Slot(s), false) => {
                if let Some((l, _)) = self.inflight.slots.get(&s) {
                    *l
                } else if let Some((l, _)) = self.inflight.all {
                    l
                } else {
                    // Staying on the one busy lane keeps the pipeline flowing.
                    self.inflight.only_lane().unwrap_or(local)
                }
            }
            (Scope::All, _) => {
                let lane = match (write, first_key_slot(def, req)) {
                    (true, Some(s)) => write_lane(s),
                    (true, None) if env.pair => Lane::Writer,
                    _ => self.inflight.only_lane().unwrap_or(local),
                };
                if !self.inflight.only_on(lane) {
                    return Action::Wait;
                }
                lane
            }
        };
        if lane == Lane::Dedicated {
            return Action::Wait;
        }
        self.forward(req, lane, scope, DedicatedUse::No, def)
    }

    /// Native mode: writes to the primary Redis's lane; reads to the local Redis's lane when
    /// it may serve them (N4), else to the primary's. One lane at a time per client, so a
    /// command waits for the client's commands in flight on the other lane.
    fn route_native(
        &mut self,
        req: &Request,
        def: Option<&'static CommandDef>,
        n: &crate::route::NativeRoute,
    ) -> Action {
        use crate::route::WriteTarget;
        let write = command::is_write(def);
        let primary = match n.writes() {
            WriteTarget::Local => Some(Lane::Shared(self.core)),
            WriteTarget::Peer => Some(Lane::PeerShared),
            WriteTarget::Hold => None,
        };
        let local_read = !write && n.reads_local() && !self.read_at_primary;
        let lane = match (local_read, primary) {
            (true, _) => Lane::Shared(self.core),
            (false, Some(p)) => p,
            (false, None) => return Action::Hold,
        };
        if !self.inflight.only_on(lane) {
            return Action::Wait;
        }
        self.forward(req, lane, Scope::All, DedicatedUse::No, def)
    }

    fn forward(
        &mut self,
        req: &Request,
        lane: Lane,
        scope: Scope,
        dedicated: DedicatedUse,
        def: Option<&'static CommandDef>,
    ) -> Action {
        let tag = Tag { lane, scope };
        let discard = self.take_discard();
        if dedicated != DedicatedUse::Raw {
            self.inflight.add(tag);
        }
        Action::Forward(Forward {
            lane,
            tag,
            frame: req.frame.clone(),
            db: self.db,
            dedicated,
            discard,
            any_db: false,
            allow_busy: def.is_some_and(|d| d.flags & command::F_ALLOW_BUSY != 0),
            write: command::is_write(def),
            // `def` is the session's lookup of `req` (None only for requests the session
            // makes up, like DISCARD's UNWATCH: looked up there).
            writer: (lane == Lane::Writer).then(|| match def {
                Some(_) => WriterRequest::looked_up(req.clone(), def),
                None => WriterRequest::one(req.clone()),
            }),
        })
    }

    /// Inside MULTI or while WATCHing: everything goes to the dedicated connection, in order.
    fn in_transaction(&mut self, name: &[u8], req: &Request, def: Option<&'static CommandDef>) -> Action {
        match name {
            b"multi" => self.in_multi = true,
            b"exec" | b"discard" => {
                self.in_multi = false;
                self.watching = false;
            }
            b"unwatch" if !self.in_multi => self.watching = false,
            b"watch" => self.watching = true,
            b"select" if req.len() == 2 => {
                if let Some(db) = parse_int(req.arg(1)) {
                    self.db = db.max(0) as u32;
                }
            }
            _ => {}
        }
        let blocking = command::facts::blocks(req, def.map(|d| d.flags).unwrap_or(0)) && !self.in_multi;
        // What waits for the replica (native, write_ack = "all"): EXEC of a block that wrote,
        // and writes outside MULTI; never a command Redis only queues.
        let acked = match name {
            b"multi" => {
                self.multi_wrote = false;
                false
            }
            b"exec" => std::mem::take(&mut self.multi_wrote),
            b"discard" => {
                self.multi_wrote = false;
                false
            }
            _ if self.in_multi => {
                self.multi_wrote |= command::is_write(def);
                false
            }
            _ => command::is_write(def),
        };
        let mut action = self.forward(req, Lane::Dedicated, Scope::All, DedicatedUse::Counted { blocking }, def);
        if let Action::Forward(f) = &mut action {
            f.write = acked;
        }
        action
    }

    /// Pair mode: MULTI is queued here and sent to the writer as one block at EXEC; WATCH
    /// and UNWATCH are kept by the writer's sequencer (it sees every write). `None`: not a
    /// transaction matter.
    fn pair_transaction(&mut self, name: &[u8], req: &Request, def: Option<&'static CommandDef>) -> Option<Action> {
        if !self.in_multi {
            return match name {
                b"multi" => {
                    self.in_multi = true;
                    self.queued.clear();
                    self.queue_failed = false;
                    self.queued_db = None;
                    Some(self.local_reply(resp::simple("OK")))
                }
                b"exec" => Some(self.local_reply(resp::error("ERR EXEC without MULTI"))),
                b"discard" => Some(self.local_reply(resp::error("ERR DISCARD without MULTI"))),
                b"watch" | b"unwatch" => {
                    if !self.inflight.only_on(Lane::Writer) {
                        return Some(Action::Wait);
                    }
                    self.pair_watching = name == b"watch";
                    Some(self.forward(req, Lane::Writer, Scope::All, DedicatedUse::No, def))
                }
                _ => None,
            };
        }
        match name {
            b"multi" => Some(self.local_reply(resp::error("ERR MULTI calls can not be nested"))),
            b"watch" => Some(self.local_reply(resp::error("ERR WATCH inside MULTI is not allowed"))),
            b"discard" => {
                self.in_multi = false;
                self.queued.clear();
                if self.pair_watching {
                    self.pair_watching = false;
                    if !self.inflight.only_on(Lane::Writer) {
                        self.in_multi = true;
                        return Some(Action::Wait);
                    }
                    let unwatch = Request::from_args(&[b"UNWATCH"]);
                    return Some(self.forward(&unwatch, Lane::Writer, Scope::All, DedicatedUse::No, None));
                }
                Some(self.local_reply(resp::simple("OK")))
            }
            b"exec" => {
                if !self.inflight.only_on(Lane::Writer) {
                    return Some(Action::Wait);
                }
                self.in_multi = false;
                let watched = std::mem::take(&mut self.pair_watching);
                let queued = std::mem::take(&mut self.queued);
                if std::mem::take(&mut self.queue_failed) {
                    return Some(
                        self.local_reply(resp::error("EXECABORT Transaction discarded because of previous errors.")),
                    );
                }
                let discard = self.take_discard();
                let tag = Tag { lane: Lane::Writer, scope: Scope::All };
                self.inflight.add(tag);
                let db = self.db;
                // A SELECT inside the block moves the client (as on Redis, once EXEC runs).
                if let Some(n) = self.queued_db.take() {
                    self.db = n;
                }
                Some(Action::Forward(Forward {
                    lane: Lane::Writer,
                    tag,
                    frame: Bytes::new(),
                    db,
                    dedicated: DedicatedUse::No,
                    discard,
                    any_db: false,
                    write: true,
                    allow_busy: false,
                    // `watched`: the writer checks this client's WATCH (and aborts the block
                    // if it has no record of it: the writer changed since).
                    writer: Some(WriterRequest::Block { queued, watched }),
                }))
            }
            _ => {
                let bad = match def {
                    None => Some(format!(
                        "ERR unknown command '{}', with args beginning with: ",
                        String::from_utf8_lossy(req.arg(0))
                    )),
                    Some(d) => command::arity_error(d, req),
                };
                if let Some(msg) = bad {
                    self.queue_failed = true;
                    return Some(self.local_reply(resp::error(&msg)));
                }
                if name == b"select" {
                    if let Some(n) = parse_int(req.arg(1)) {
                        self.queued_db = Some(n.max(0) as u32);
                    }
                }
                self.queued.push(req.clone());
                Some(self.local_reply(resp::simple("QUEUED")))
            }
        }
    }

    fn take_discard(&mut self) -> bool {
        match self.reply_mode {
            ReplyMode::On => false,
            ReplyMode::Off => true,
            ReplyMode::Skip => {
                self.reply_mode = ReplyMode::On;
                true
            }
        }
    }

    fn local_reply(&mut self, reply: Bytes) -> Action {
        if self.take_discard() {
            Action::Nothing
        } else {
            Action::Reply(reply)
        }
    }

    fn reset(&mut self, env: &SessionEnv) {
        self.db = 0;
        self.proto = 2;
        self.name = None;
        self.authed = env.password.is_empty();
        self.user = None;
        self.verified = None;
        self.reply_mode = ReplyMode::On;
        self.dedicated_lost();
        self.queued.clear();
        self.queue_failed = false;
        self.queued_db = None;
        self.pair_watching = false;
    }

    /// Commands the proxy answers itself; `None` for everything else.
    fn local_command(&mut self, name: &[u8], req: &Request, env: &SessionEnv) -> Option<Action> {
        let reply = match name {
            b"ping" => match req.len() {
                1 => resp::simple("PONG"),
                2 => resp::bulk(req.arg(1)),
                _ => wrong_args("ping"),
            },
            b"echo" => match req.len() {
                2 => resp::bulk(req.arg(1)),
                _ => wrong_args("echo"),
            },
            b"select" => {
                if req.len() != 2 {
                    wrong_args("select")
                } else {
                    match parse_int(req.arg(1)) {
                        None => resp::error("ERR value is not an integer or out of range"),
                        Some(db) if db < 0 || db >= env.databases as i64 => resp::error("ERR DB index is out of range"),
                        Some(db) => {
                            self.db = db as u32;
                            resp::simple("OK")
                        }
                    }
                }
            }
            // Who this client is, not who the shared upstream connection is.
            b"acl" if req.len() == 2 && req.arg(1).eq_ignore_ascii_case(b"whoami") => {
                resp::bulk(self.user.as_ref().map_or(&b"default"[..], |u| &u.name[..]))
            }
            b"auth" if req.len() == 3 && req.arg(1) != b"default" => {
                if env.pair {
                    resp::error(ACL_USERS_IN_MIRROR)
                } else {
                    let user = AclUser { name: req.arg_bytes(1), pass: req.arg_bytes(2) };
                    return Some(Action::Auth { user, hello: false });
                }
            }
            b"auth" => self.auth(req, env),
            b"hello" => {
                if let Some(user) = hello_acl_user(req) {
                    if env.pair {
                        return Some(self.local_reply(resp::error(ACL_USERS_IN_MIRROR)));
                    }
                    if self.verified.as_ref() != Some(&user) {
                        return Some(Action::Auth { user, hello: true });
                    }
                }
                let wants_proto_change = req.len() > 1 && parse_int(req.arg(1)).is_some_and(|p| p != self.proto as i64);
                if wants_proto_change && !self.inflight.is_empty() {
                    return Some(Action::Wait);
                }
                let reply = self.hello(req, env);
                return Some(Action::Reply(reply));
            }
            b"client" if req.len() >= 2 => {
                let sub = req.arg(1).to_ascii_lowercase();
                match sub.as_slice() {
                    b"setname" => {
                        if req.len() != 3 {
                            wrong_args("client|setname")
                        } else {
                            match valid_name(req.arg(2)) {
                                Ok(()) => {
                                    self.name = if req.arg(2).is_empty() { None } else { Some(req.arg_bytes(2)) };
                                    resp::simple("OK")
                                }
                                Err(e) => e,
                            }
                        }
                    }
                    b"getname" => match &self.name {
                        Some(n) => resp::bulk(n),
                        None => resp::null(self.proto),
                    },
                    b"id" => resp::int(self.id as i64),
                    // Client metadata (every redis-py/redis-rs connection sends it first):
                    // kept by the proxy for CLIENT LIST/INFO; on a shared upstream connection it
                    // would describe every client of the core, and it must not wait for a
                    // primary during a failover.
                    b"setinfo" if req.len() == 4 => {
                        let attr = req.arg(2).to_ascii_lowercase();
                        let value = req.arg(3);
                        let valid = value.iter().all(|&c| (b'!'..=b'~').contains(&c));
                        match attr.as_slice() {
                            b"lib-name" | b"lib-ver" if !valid => resp::error(&format!(
                                "ERR {} cannot contain spaces, newlines or special characters.",
                                String::from_utf8_lossy(&attr)
                            )),
                            b"lib-name" => {
                                self.lib.0 = req.arg_bytes(3);
                                resp::simple("OK")
                            }
                            b"lib-ver" => {
                                self.lib.1 = req.arg_bytes(3);
                                resp::simple("OK")
                            }
                            _ => resp::error(&format!(
                                "ERR Unrecognized option '{}'",
                                String::from_utf8_lossy(req.arg(2))
                            )),
                        }
                    }
                    b"setinfo" => wrong_args("client|setinfo"),
                    // Connection flags: on a shared upstream connection they would apply to
                    // every client of the core, so the proxy takes them itself.
                    b"no-evict" if req.len() == 3 => match req.arg(2).to_ascii_lowercase().as_slice() {
                        b"on" | b"off" => resp::simple("OK"),
                        _ => resp::error("ERR syntax error"),
                    },
                    b"info" => resp::bulk(self.info().line().as_bytes()),
                    b"list" => match parse_client_list(req) {
                        Ok(q) => return Some(Action::Clients(q)),
                        Err(e) => e,
                    },
                    b"kill" => match parse_client_kill(req) {
                        Ok(q) => return Some(Action::Clients(q)),
                        Err(e) => e,
                    },
                    b"reply" if req.len() == 3 => {
                        let mode = req.arg(2).to_ascii_lowercase();
                        match mode.as_slice() {
                            b"on" => {
                                self.reply_mode = ReplyMode::On;
                                resp::simple("OK")
                            }
                            b"off" => {
                                self.reply_mode = ReplyMode::Off;
                                return Some(Action::Nothing);
                            }
                            b"skip" => {
                                if self.reply_mode == ReplyMode::On {
                                    self.reply_mode = ReplyMode::Skip;
                                    // The SKIP itself is not answered either: mark it consumed.
                                    return Some(Action::Nothing);
                                }
                                return Some(Action::Nothing);
                            }
                            _ => resp::error("ERR syntax error"),
                        }
                    }
                    _ => return None,
                }
            }
            _ => return None,
        };
        Some(self.local_reply(reply))
    }

    /// Redis accepted `user`'s credentials (an [`Action::Auth`]): for `AUTH`, the client is
    /// that user from now on; for `HELLO`, the request offered again completes it.
    pub fn acl_verified(&mut self, user: AclUser, hello: bool) -> Bytes {
        if hello {
            self.verified = Some(user);
            return Bytes::new();
        }
        self.user = Some(user);
        self.authed = true;
        resp::simple("OK")
    }

    fn auth(&mut self, req: &Request, env: &SessionEnv) -> Bytes {
        let (user, pass): (&[u8], &[u8]) = match req.len() {
            2 => (b"default", req.arg(1)),
            3 => (req.arg(1), req.arg(2)),
            _ => return resp::error("ERR syntax error"),
        };
        if env.password.is_empty() {
            if req.len() == 2 {
                return resp::error(
                    "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
                );
            }
            if user == b"default" {
                self.authed = true;
                self.user = None;
                return resp::simple("OK");
            }
            return resp::error(WRONGPASS);
        }
        if user == b"default" && pass == env.password.as_bytes() {
            self.authed = true;
            self.user = None;
            resp::simple("OK")
        } else {
            resp::error(WRONGPASS)
        }
    }

    fn hello(&mut self, req: &Request, env: &SessionEnv) -> Bytes {
        // Good for this one offer only, whatever its outcome.
        let verified = self.verified.take();
        let mut proto = self.proto;
        let mut i = 1;
        if req.len() > 1 {
            match parse_int(req.arg(1)) {
                Some(p) if p == 2 || p == 3 => proto = p as u8,
                Some(_) => return resp::error("NOPROTO unsupported protocol version"),
                None => return resp::error("ERR Protocol version is not an integer or out of range"),
            }
            i = 2;
        }
        let mut authed_now = false;
        let mut new_name = None;
        let mut new_user = None;
        while i < req.len() {
            let opt = req.arg(i).to_ascii_lowercase();
            let more = req.len() - i - 1;
            if opt == b"auth" && more >= 2 {
                let user = req.arg(i + 1);
                let pass = req.arg(i + 2);
                let acl = AclUser { name: req.arg_bytes(i + 1), pass: req.arg_bytes(i + 2) };
                let ok = if user != b"default" {
                    // Checked by Redis just before this request was offered again.
                    verified.as_ref() == Some(&acl)
                } else if env.password.is_empty() {
                    true
                } else {
                    pass == env.password.as_bytes()
                };
                if !ok {
                    return resp::error(WRONGPASS);
                }
                new_user = Some((user != b"default").then_some(acl));
                authed_now = true;
                i += 3;
            } else if opt == b"setname" && more >= 1 {
                if let Err(e) = valid_name(req.arg(i + 1)) {
                    return e;
                }
                new_name = Some(req.arg_bytes(i + 1));
                i += 2;
            } else {
                return resp::error(&format!(
                    "ERR Syntax error in HELLO option '{}'",
                    String::from_utf8_lossy(req.arg(i))
                ));
            }
        }
        if !self.authed && !authed_now {
            return resp::error(
                "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time",
            );
        }
        if authed_now {
            self.authed = true;
        }
        if let Some(u) = new_user {
            self.user = u;
        }
        if let Some(n) = new_name {
            self.name = if n.is_empty() { None } else { Some(n) };
        }
        self.proto = proto;
        let mut out = BytesMut::with_capacity(128);
        if proto >= 3 {
            out.put_slice(b"%7\r\n");
        } else {
            resp::push_array_header(&mut out, 14);
        }
        resp::push_bulk(&mut out, b"server");
        resp::push_bulk(&mut out, b"redis");
        resp::push_bulk(&mut out, b"version");
        resp::push_bulk(&mut out, env.redis_version.as_bytes());
        resp::push_bulk(&mut out, b"proto");
        resp::push_int(&mut out, proto as i64);
        resp::push_bulk(&mut out, b"id");
        resp::push_int(&mut out, self.id as i64);
        resp::push_bulk(&mut out, b"mode");
        resp::push_bulk(&mut out, b"standalone");
        resp::push_bulk(&mut out, b"role");
        resp::push_bulk(&mut out, b"master");
        resp::push_bulk(&mut out, b"modules");
        resp::push_array_header(&mut out, 0);
        out.freeze()
    }

    /// What CLIENT LIST shows of this client.
    pub fn info(&self) -> ClientInfo {
        ClientInfo {
            id: self.id,
            core: self.core,
            peer: self.peer.clone(),
            local: self.local.clone(),
            name: self.name.clone(),
            lib: self.lib.clone(),
            user: self.user.as_ref().map_or_else(|| Bytes::from_static(b"default"), |u| u.name.clone()),
            db: self.db,
            proto: self.proto,
            flags: if self.in_multi {
                'x'
            } else if self.raw {
                'P'
            } else {
                'N'
            },
            cmd: self.cmd,
        }
    }

    /// Whether `info` (published earlier) still describes this client.
    pub fn info_matches(&self, info: &ClientInfo) -> bool {
        info.db == self.db
            && info.proto == self.proto
            && info.name == self.name
            && info.lib == self.lib
            && self.user.as_ref().map_or(&b"default"[..], |u| &u.name[..]) == &info.user[..]
            && info.flags
                == if self.in_multi {
                    'x'
                } else if self.raw {
                    'P'
                } else {
                    'N'
                }
    }
}

/// CLIENT LIST [TYPE normal|pubsub|master|replica] [ID id [id ...]].
fn parse_client_list(req: &Request) -> Result<ClientQuery, Bytes> {
    let mut ids = None;
    let mut kind = None;
    let mut i = 2;
    while i < req.len() {
        let opt = req.arg(i).to_ascii_lowercase();
        if opt == b"type" && i + 1 < req.len() {
            let t = String::from_utf8_lossy(req.arg(i + 1)).to_ascii_lowercase();
            if !matches!(t.as_str(), "normal" | "pubsub" | "master" | "replica" | "slave") {
                return Err(resp::error(&format!("ERR Unknown client type '{t}'")));
            }
            kind = Some(t);
            i += 2;
        } else if opt == b"id" && i + 1 < req.len() {
            let mut list = Vec::new();
            for a in req.args().skip(i + 1) {
                match parse_int(a) {
                    Some(v) if v > 0 => list.push(v as u64),
                    _ => return Err(resp::error("ERR Invalid client ID")),
                }
            }
            ids = Some(list);
            i = req.len();
        } else {
            return Err(resp::error("ERR syntax error"));
        }
    }
    Ok(ClientQuery::List { ids, kind })
}

/// CLIENT KILL addr:port | CLIENT KILL [ID id] [ADDR a] [LADDR a] [TYPE t] [USER u] [SKIPME yes|no].
fn parse_client_kill(req: &Request) -> Result<ClientQuery, Bytes> {
    if req.len() < 3 {
        return Err(wrong_args("client|kill"));
    }
    if req.len() == 3 {
        let addr = String::from_utf8_lossy(req.arg(2)).into_owned();
        return Ok(ClientQuery::Kill(KillFilter { addr: Some(addr), legacy: true, ..KillFilter::default() }));
    }
    if req.len() < 4 || req.len() % 2 != 0 {
        return Err(resp::error("ERR syntax error"));
    }
    let mut f = KillFilter { skip_me: true, ..KillFilter::default() };
    for i in (2..req.len()).step_by(2) {
        let value = String::from_utf8_lossy(req.arg(i + 1)).into_owned();
        match req.arg(i).to_ascii_lowercase().as_slice() {
            b"id" => match parse_int(req.arg(i + 1)) {
                Some(v) if v > 0 => f.id = Some(v as u64),
                _ => return Err(resp::error("ERR client-id should be greater than 0")),
            },
            b"addr" => f.addr = Some(value),
            b"laddr" => f.laddr = Some(value),
            b"type" => {
                let t = value.to_ascii_lowercase();
                if !matches!(t.as_str(), "normal" | "pubsub" | "master" | "replica" | "slave") {
                    return Err(resp::error(&format!("ERR Unknown client type '{value}'")));
                }
                f.kind = Some(t);
            }
            // (The proxy does not know which users Redis has: an unknown one matches nobody,
            // where Redis answers "No such user".)
            b"user" => f.user = Some(value),
            b"skipme" => match value.to_ascii_lowercase().as_str() {
                "yes" => f.skip_me = true,
                "no" => f.skip_me = false,
                _ => return Err(resp::error("ERR syntax error")),
            },
            _ => return Err(resp::error("ERR syntax error")),
        }
    }
    Ok(ClientQuery::Kill(f))
}

/// `CONFIG SET ... requirepass ...` (any position among the parameter/value pairs).
fn sets_requirepass(req: &Request) -> bool {
    req.len() >= 4
        && req.arg(1).eq_ignore_ascii_case(b"set")
        && (2..req.len()).step_by(2).any(|i| req.arg(i).eq_ignore_ascii_case(b"requirepass"))
}

/// Rewrite `CLIENT TRACKING ... REDIRECT <id>` and `CLIENT UNBLOCK <id>` from proxy ids to
/// the Redis ids of those clients' dedicated connections. `None`: nothing to rewrite.
fn translate_client_ids(name: &[u8], req: &Request, ids: &UpstreamIds) -> Option<Request> {
    if name != b"client" || req.len() < 3 {
        return None;
    }
    let sub = req.arg(1);
    let at = if sub.eq_ignore_ascii_case(b"unblock") {
        2
    } else if sub.eq_ignore_ascii_case(b"tracking") {
        (3..req.len()).find(|&i| req.arg(i - 1).eq_ignore_ascii_case(b"redirect"))?
    } else {
        return None;
    };
    let id = parse_int(req.arg(at)).filter(|&v| v > 0)? as u64;
    let upstream = ids.translate(id).to_string();
    let args: Vec<&[u8]> = req.args().enumerate().map(|(i, a)| if i == at { upstream.as_bytes() } else { a }).collect();
    Some(Request::from_args(&args))
}

fn valid_name(name: &[u8]) -> Result<(), Bytes> {
    if name.iter().any(|&c| !(b'!'..=b'~').contains(&c)) {
        return Err(resp::error("ERR Client names cannot contain spaces, newlines or special characters."));
    }
    Ok(())
}

/// `SCRIPT KILL` and `FUNCTION KILL`.
fn is_script_kill(name: &[u8], req: &Request) -> bool {
    matches!(name, b"script" | b"function") && req.len() == 2 && req.arg(1).eq_ignore_ascii_case(b"kill")
}

/// `Slot(s)` when every key of the command lies in slot `s`; `All` otherwise (no keys,
/// several slots).
fn single_slot(def: &CommandDef, req: &Request) -> Scope {
    let keys = command::key_indices(def, req);
    let mut it = keys.iter();
    let Some(&first) = it.next() else { return Scope::All };
    let slot = key_slot(req.arg(first));
    if it.all(|&k| key_slot(req.arg(k)) == slot) {
        Scope::Slot(slot)
    } else {
        Scope::All
    }
}

fn first_key_slot(def: Option<&CommandDef>, req: &Request) -> Option<u16> {
    let def = def?;
    let keys = command::key_indices(def, req);
    keys.first().map(|&k| key_slot(req.arg(k)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(threads: usize, slot: bool) -> SessionEnv {
        SessionEnv {
            password: String::new(),
            refused: Refused::new(&["shutdown"]),
            threads,
            slot_sequencing: slot,
            pair: false,
            local_in_sync: Default::default(),
            native: None,
            write_ack_local: false,
            redis_version: "7.0.15".into(),
            databases: 16,
            upstream_ids: UpstreamIds::default(),
        }
    }

    fn req(args: &[&str]) -> Request {
        Request::from_args(args)
    }

    fn fwd(a: Action) -> Forward {
        match a {
            Action::Forward(f) => f,
            other => panic!("expected Forward, got {other:?}"),
        }
    }

    #[test]
    fn read_after_own_write_follows_it_to_the_sequencer_lane() {
        let env = env(2, true);
        let mut s = Session::new(1, 0, &env, "c".into(), "l".into());
        // Find a key whose slot belongs to core 1.
        let key = (0..).map(|i| format!("k{i}")).find(|k| key_slot(k.as_bytes()) % 2 == 1).unwrap();
        let w = fwd(s.on_request(&req(&["SET", &key, "v"]), &env));
        assert_eq!(w.lane, Lane::Shared(1));
        let r = fwd(s.on_request(&req(&["GET", &key]), &env));
        assert_eq!(r.lane, Lane::Shared(1), "the read must queue behind the write");
        // A keyless read cannot run elsewhere while the write is pending... it joins lane 1.
        let k = fwd(s.on_request(&req(&["DBSIZE"]), &env));
        assert_eq!(k.lane, Lane::Shared(1));
        s.completed(w.tag);
        s.completed(r.tag);
        s.completed(k.tag);
        let r2 = fwd(s.on_request(&req(&["GET", &key]), &env));
        assert_eq!(r2.lane, Lane::Shared(0), "idle client reads on its own core");
    }

    #[test]
    fn write_waits_for_a_read_of_the_same_slot_on_another_lane() {
        let env = env(2, true);
        let mut s = Session::new(1, 0, &env, "c".into(), "l".into());
        let key = (0..).map(|i| format!("k{i}")).find(|k| key_slot(k.as_bytes()) % 2 == 1).unwrap();
        let r = fwd(s.on_request(&req(&["GET", &key]), &env));
        assert_eq!(r.lane, Lane::Shared(0));
        assert!(matches!(s.on_request(&req(&["SET", &key, "v"]), &env), Action::Wait));
        s.completed(r.tag);
        assert_eq!(fwd(s.on_request(&req(&["SET", &key, "v"]), &env)).lane, Lane::Shared(1));
    }

    #[test]
    fn transactions_and_pubsub_use_the_dedicated_connection() {
        let env = env(1, false);
        let mut s = Session::new(1, 0, &env, "c".into(), "l".into());
        let g = fwd(s.on_request(&req(&["GET", "a"]), &env));
        assert!(matches!(s.on_request(&req(&["MULTI"]), &env), Action::Wait));
        s.completed(g.tag);
        let m = fwd(s.on_request(&req(&["MULTI"]), &env));
        assert_eq!(m.lane, Lane::Dedicated);
        assert_eq!(fwd(s.on_request(&req(&["PING"]), &env)).lane, Lane::Dedicated, "PING is queued inside MULTI");
        assert_eq!(fwd(s.on_request(&req(&["EXEC"]), &env)).lane, Lane::Dedicated);
        assert!(!s.in_dedicated_state());
        assert!(matches!(s.on_request(&req(&["PING"]), &env), Action::Reply(_)));
        let sub = fwd(s.on_request(&req(&["SUBSCRIBE", "ch"]), &env));
        assert_eq!(sub.dedicated, DedicatedUse::Raw);
        assert!(s.is_raw());
    }

    #[test]
    fn script_kill_goes_on_its_own_connection_in_any_database() {
        let env = env(1, false);
        let mut s = Session::new(1, 0, &env, "c".into(), "l".into());
        assert!(matches!(s.on_request(&req(&["SELECT", "9"]), &env), Action::Reply(_)));
        for cmd in [["SCRIPT", "KILL"], ["function", "kill"]] {
            let f = fwd(s.on_request(&req(&cmd), &env));
            assert_eq!(f.lane, Lane::Dedicated, "{cmd:?}");
            assert!(f.any_db, "{cmd:?}: must not need a SELECT");
            assert!(!s.in_dedicated_state(), "{cmd:?}: the client is not bound to the connection");
            s.completed(f.tag);
        }
        let g = fwd(s.on_request(&req(&["SCRIPT", "FLUSH"]), &env));
        assert_eq!(g.lane, Lane::Shared(0));
        assert!(!g.any_db);
        assert_eq!(g.db, 9);
    }

    #[test]
    fn auth_select_hello_refusals() {
        let mut env = env(1, false);
        env.password = "pw".into();
        let mut s = Session::new(7, 0, &env, "c".into(), "l".into());
        match s.on_request(&req(&["GET", "a"]), &env) {
            Action::Reply(b) => assert_eq!(&b[..], b"-NOAUTH Authentication required.\r\n"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(s.on_request(&req(&["AUTH", "bad"]), &env), Action::Reply(b) if b.starts_with(b"-WRONGPASS")));
        assert!(matches!(s.on_request(&req(&["AUTH", "pw"]), &env), Action::Reply(b) if &b[..] == b"+OK\r\n"));
        assert!(
            matches!(s.on_request(&req(&["SELECT", "16"]), &env), Action::Reply(b) if b.starts_with(b"-ERR DB index"))
        );
        assert!(matches!(s.on_request(&req(&["SELECT", "3"]), &env), Action::Reply(_)));
        assert_eq!(fwd(s.on_request(&req(&["GET", "a"]), &env)).db, 3);
        assert!(
            matches!(s.on_request(&req(&["shutdown"]), &env), Action::Reply(b) if b.starts_with(b"-ERR command 'shutdown' is not allowed"))
        );
        let s2 = &mut Session::new(8, 0, &env, "c".into(), "l".into());
        match s2.on_request(&req(&["HELLO", "3", "AUTH", "default", "pw"]), &env) {
            Action::Reply(b) => assert!(b.starts_with(b"%7\r\n")),
            other => panic!("{other:?}"),
        }
        assert_eq!(s2.proto, 3);
    }
}

//! Native mode's control plane (DESIGN.md N1–N7): which Redis of the pair is the primary and
//! which one replicates it (`REPLICAOF`), when to fail over, where writes and reads go, when the
//! keys written while cut off are recorded, and when a partition's writes must be merged.
//!
//! Sans-IO, like quinn-proto: the shell polls both Redis (`INFO`), exchanges [`PeerReport`]s
//! with the peer sidecar, passes in what it saw and the time (milliseconds on any monotonic
//! clock), and carries out the [`Command`]s that [`NativeNode::tick`] returns. [`Route`] says
//! where writes and reads go right now. This module owns the decisions only; it never touches
//! a socket, a clock or the data.
//!
//! Roles follow evidence (N5): who becomes primary after a start, crash or partition is decided
//! by comparing both Redis's replication histories ([`compare`]: replid, replid2, offsets), never
//! by what a sidecar remembers. Each sidecar changes only its own Redis's role, except that when
//! the peer's sidecar is silent the peer's Redis may be promoted to keep the data it holds.

use std::cmp::Ordering;

/// One side of the pair, seen from this sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// This sidecar's own Redis.
    Local,
    /// The peer sidecar's Redis.
    Peer,
}

/// What `INFO server replication keyspace` says about one Redis.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplInfo {
    /// `run_id`: changes on every restart of the process.
    pub run_id: String,
    /// `role:master`.
    pub master: bool,
    /// `master_replid`: the history this Redis is on.
    pub replid: String,
    /// `master_replid2`: the history it continued from (all zeros when none).
    pub replid2: String,
    /// `master_repl_offset`: bytes of history (for a replica: processed from its primary).
    pub offset: u64,
    /// `second_repl_offset`: the first offset of `replid`'s part of the history (-1: none).
    pub second_offset: i64,
    /// A replica whose link to its primary is up (`master_link_status:up`).
    pub link_up: bool,
    /// A replica in the middle of a full sync (`master_sync_in_progress:1`).
    pub syncing: bool,
    /// Keys in all databases (`INFO keyspace`).
    pub keys: u64,
    /// Full resyncs this Redis served as a primary since it started (`INFO stats` `sync_full`).
    pub sync_full: u64,
    /// Partial resyncs it accepted (`sync_partial_ok`).
    pub sync_partial_ok: u64,
}

impl ReplInfo {
    /// Parse the text of `INFO` (sections server, replication and keyspace). `None` when the
    /// replication section is missing.
    pub fn parse(text: &str) -> Option<ReplInfo> {
        let mut info = ReplInfo { second_offset: -1, ..ReplInfo::default() };
        let mut saw_role = false;
        for line in text.lines() {
            let Some((k, v)) = line.trim_end().split_once(':') else { continue };
            match k {
                "run_id" => info.run_id = v.to_string(),
                "role" => {
                    saw_role = true;
                    info.master = v == "master";
                }
                "master_replid" => info.replid = v.to_string(),
                "master_replid2" => info.replid2 = v.to_string(),
                "master_repl_offset" => info.offset = v.parse().unwrap_or(0),
                "second_repl_offset" => info.second_offset = v.parse().unwrap_or(-1),
                "master_link_status" => info.link_up = v == "up",
                "master_sync_in_progress" => info.syncing = v == "1",
                "sync_full" => info.sync_full = v.parse().unwrap_or(0),
                "sync_partial_ok" => info.sync_partial_ok = v.parse().unwrap_or(0),
                _ if k.starts_with("db") && k[2..].bytes().all(|b| b.is_ascii_digit()) => {
                    let keys = v.split(',').find_map(|f| f.strip_prefix("keys=")).and_then(|n| n.parse::<u64>().ok());
                    info.keys += keys.unwrap_or(0);
                }
                _ => {}
            }
        }
        saw_role.then_some(info)
    }

    /// The history this Redis effectively holds: a Redis that switched histories (promoted)
    /// and has written nothing since holds exactly its old history.
    fn effective(&self) -> (&str, u64) {
        if self.second_offset > 0 && self.offset + 1 == self.second_offset as u64 {
            (&self.replid2, self.offset)
        } else {
            (&self.replid, self.offset)
        }
    }

    /// `replid:offset (replid2:second_offset)` for log lines.
    pub fn history(&self) -> String {
        let short = |id: &str| id.get(..8).unwrap_or(id).to_string();
        format!(
            "{}:{} ({}:{}) {}",
            short(&self.replid),
            self.offset,
            short(&self.replid2),
            self.second_offset,
            if self.master { "master" } else { "replica" }
        )
    }

    /// Holds no data and no history.
    pub fn is_empty(&self) -> bool {
        self.offset == 0 && self.keys == 0
    }
}

/// Whether `x`'s history contains all of `y`'s.
fn contains(x: &ReplInfo, y: &ReplInfo) -> bool {
    if y.is_empty() {
        return true;
    }
    let (yid, yoff) = y.effective();
    (x.replid == yid && yoff <= x.offset) || (x.second_offset > 0 && x.replid2 == yid && yoff < x.second_offset as u64)
}

/// Whether two histories share an ancestor (a replid in common): two forks of one history,
/// not unrelated data.
pub fn related(x: &ReplInfo, y: &ReplInfo) -> bool {
    let ids = |i: &ReplInfo| {
        [i.replid.clone(), i.replid2.clone()]
            .into_iter()
            .filter(|id| !id.is_empty() && id.bytes().any(|b| b != b'0'))
            .collect::<Vec<_>>()
    };
    let (a, b) = (ids(x), ids(y));
    a.iter().any(|id| b.contains(id))
}

/// How much history two Redis share: the offset up to which both hold the same writes
/// (`None`: nothing in common).
pub fn fork_point(x: &ReplInfo, y: &ReplInfo) -> Option<u64> {
    let real = |id: &str| !id.is_empty() && id.bytes().any(|b| b != b'0');
    let switched_at = |i: &ReplInfo| (i.second_offset > 0).then(|| i.second_offset as u64 - 1);
    if real(&x.replid) && x.replid == y.replid {
        return Some(x.offset.min(y.offset));
    }
    if real(&x.replid2) && x.replid2 == y.replid {
        return switched_at(x).map(|f| f.min(y.offset));
    }
    if real(&y.replid2) && y.replid2 == x.replid {
        return switched_at(y).map(|f| f.min(x.offset));
    }
    if real(&x.replid2) && x.replid2 == y.replid2 {
        return switched_at(x).zip(switched_at(y)).map(|(a, b)| a.min(b));
    }
    None
}

/// How two Redis's histories relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holds {
    /// The first holds everything the second does, and more.
    First,
    /// The second holds everything the first does, and more.
    Second,
    /// The same history.
    Equal,
    /// Each holds writes the other lacks (a partition, or unrelated data).
    Diverged,
}

/// Compare two Redis's replication histories (DESIGN.md N5).
pub fn compare(x: &ReplInfo, y: &ReplInfo) -> Holds {
    match (contains(x, y), contains(y, x)) {
        (true, true) => Holds::Equal,
        (true, false) => Holds::First,
        (false, true) => Holds::Second,
        (false, false) => Holds::Diverged,
    }
}

/// Which of two Redis should be the primary of the pair when neither is already serving as
/// one: the copy that holds more; between equal copies the one already primary, then the
/// higher priority; between diverged copies the longer history, then more keys, then the
/// higher priority. Symmetric: both sidecars reach the same answer from the same evidence.
/// `true`: the first.
pub fn first_should_lead(x: &ReplInfo, x_prio: (u32, &str), y: &ReplInfo, y_prio: (u32, &str)) -> bool {
    let by_priority = x_prio.0.cmp(&y_prio.0).then_with(|| y_prio.1.cmp(x_prio.1)) == Ordering::Greater;
    match compare(x, y) {
        Holds::First => true,
        Holds::Second => false,
        Holds::Equal => match (x.master, y.master) {
            (true, false) => true,
            (false, true) => false,
            _ => by_priority,
        },
        Holds::Diverged => match x.offset.cmp(&y.offset).then(x.keys.cmp(&y.keys)) {
            Ordering::Greater => true,
            Ordering::Less => false,
            Ordering::Equal => by_priority,
        },
    }
}

/// Why a Redis could not be observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// Connection refused or closed: the process is gone (or restarting).
    Refused,
    /// No answer in time: stalled, paused or cut off.
    Timeout,
}

/// The last observations of one Redis.
#[derive(Debug, Clone, Default)]
struct Observed {
    /// The last answer, kept while the Redis is unreachable.
    info: Option<ReplInfo>,
    /// Whether the last poll answered.
    up: bool,
    /// Whether the last failure was a refused connection.
    refused: bool,
    /// When it last answered.
    last_ok: Option<u64>,
    /// The run_id seen before the current one (a restart shows as a change).
    prev_run_id: String,
    /// The run_id changed since the node last looked (see `NativeNode::tick`).
    restarted: bool,
    /// The last answer of the previous run, when it restarted.
    before_restart: Option<ReplInfo>,
}

impl Observed {
    fn current(&self) -> Option<&ReplInfo> {
        if self.up {
            self.info.as_ref()
        } else {
            None
        }
    }

    fn down_for(&self, now: u64, since_start: u64) -> u64 {
        now.saturating_sub(self.last_ok.unwrap_or(since_start))
    }

    fn record(&mut self, now: u64, seen: Result<ReplInfo, Unreachable>) {
        match seen {
            Ok(info) => {
                if let Some(old) = &self.info {
                    if old.run_id != info.run_id {
                        self.prev_run_id = old.run_id.clone();
                        self.restarted = true;
                        self.before_restart = Some(old.clone());
                    }
                }
                self.info = Some(info);
                self.up = true;
                self.refused = false;
                self.last_ok = Some(now);
            }
            Err(why) => {
                self.up = false;
                self.refused = why == Unreachable::Refused;
            }
        }
    }
}

/// What each sidecar tells the other in every heartbeat (and the status shows).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerReport {
    /// The sender's node id.
    pub id: String,
    /// The sender's epoch.
    pub epoch: u64,
    /// The node whose Redis the sender takes for the primary (empty: undecided).
    pub primary: String,
    /// Whether the sender's own Redis answers it.
    pub redis_up: bool,
    /// Whether the sender records the keys it writes (it is cut off from us).
    pub recording: bool,
    /// Whether the sender is merging its partition writes into our Redis.
    pub merging: bool,
    /// The sender's priority.
    pub priority: u32,
    /// Two primaries met and the sender decided: the node whose Redis stays primary.
    pub winner: String,
    /// The run_id of the primary Redis the sender's decision was taken on (empty: none). A
    /// decision is about one run: a Redis restarted since (empty, or from an older snapshot)
    /// must be compared again, not adopted on a report that predates it.
    pub primary_run: String,
    /// The sender is handing its primary role to us (it is leaving): hold writes until its
    /// next decision.
    pub handover: bool,
    /// The sender holds its writes for our handover (the answer to `handover`).
    pub handover_held: bool,
    /// The furthest offset the sender saw our Redis hold as a linked replica of its own: a
    /// merge into the sender's Redis may replace whole keys only from a copy that forked at
    /// or after it (below it, our copy lacks writes the sender's holds).
    pub confirmed: u64,
    /// The replid of the sender's history `confirmed` is an offset of.
    pub confirmed_replid: String,
}

impl PeerReport {
    /// `key:value` lines.
    pub fn encode(&self) -> String {
        format!(
            "id:{}\nepoch:{}\nprimary:{}\nredis_up:{}\nrecording:{}\nmerging:{}\npriority:{}\nwinner:{}\nprimary_run:{}\nhandover:{}\nhandover_held:{}\nconfirmed:{}\nconfirmed_replid:{}\n",
            self.id,
            self.epoch,
            self.primary,
            self.redis_up as u8,
            self.recording as u8,
            self.merging as u8,
            self.priority,
            self.winner,
            self.primary_run,
            self.handover as u8,
            self.handover_held as u8,
            self.confirmed,
            self.confirmed_replid
        )
    }

    /// Parse what `encode` wrote; `None` without an id.
    pub fn decode(text: &str) -> Option<PeerReport> {
        let mut r = PeerReport::default();
        // (A stray `\r` is not part of any value.)
        for line in text.lines().map(|l| l.trim_end_matches('\r')) {
            let Some((k, v)) = line.split_once(':') else { continue };
            match k {
                "id" => r.id = v.to_string(),
                "epoch" => r.epoch = v.parse().ok()?,
                "primary" => r.primary = v.to_string(),
                "redis_up" => r.redis_up = v == "1",
                "recording" => r.recording = v == "1",
                "merging" => r.merging = v == "1",
                "priority" => r.priority = v.parse().ok()?,
                "winner" => r.winner = v.to_string(),
                "primary_run" => r.primary_run = v.to_string(),
                "handover" => r.handover = v == "1",
                "handover_held" => r.handover_held = v == "1",
                "confirmed" => r.confirmed = v.parse().ok()?,
                "confirmed_replid" => r.confirmed_replid = v.to_string(),
                _ => {}
            }
        }
        (!r.id.is_empty()).then_some(r)
    }
}

/// What to do when the peer cannot be reached at start (DESIGN.md N5's lone-start rule):
/// `[replication] lone_start`.
pub use crate::config::LoneStart;

/// The control plane's settings.
#[derive(Debug, Clone)]
pub struct NativeConfig {
    pub id: String,
    pub priority: u32,
    pub peer_id: String,
    pub peer_priority: u32,
    pub failover_timeout_ms: u64,
    pub lone_start: LoneStart,
    /// How long the winner of a partition holds its writes for the loser's merge, at most.
    pub merge_hold_ms: u64,
}

/// A change the shell must make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `REPLICAOF NO ONE` on this Redis.
    Promote(Side),
    /// `REPLICAOF <peer's Redis>` on the local Redis.
    FollowPeer,
    /// Copy the keys this side recorded while cut off (those the peer did not write too) into
    /// the peer's Redis, then make the local Redis a replica of it; report with
    /// [`NativeNode::merge_done`]. This side lost the partition.
    ///
    /// `overwrite`: the two histories fork from a common one, so a key this side wrote holds
    /// everything the peer's copy held before the fork and replaces it (`RESTORE … REPLACE`).
    /// Without a common history (one side started alone from less) a key the peer's Redis
    /// already holds keeps the peer's value (a conflict: counted, never overwritten).
    ///
    /// `peer_run`: the run of the peer's Redis the decision was made on. The shell copies
    /// into that run only: if the peer's Redis restarted since (its `run_id` differs before
    /// the copy or before `REPLICAOF`), the merge fails and is decided again.
    Merge { overwrite: bool, peer_run: String },
    /// Forget the recorded keys: the peer's Redis replicates everything again.
    ClearRecorded,
}

/// Where requests go right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The primary Redis writes go to; `None`: hold them (the pair is forming, failing over,
    /// merging, or handing the primary role over).
    pub writes: Option<Side>,
    /// Reads may use the local Redis (it is the primary, or a replica whose link is up).
    pub reads_local: bool,
    /// Record the keys of the writes sent now (this side may be cut off from the other).
    pub recording: bool,
}

/// The phase of a partition merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Merge {
    Idle,
    /// This side lost: its merge runs (since).
    Running(u64),
    /// This side won: it holds writes while the loser copies (until).
    Hosting(u64),
}

/// What a restart of the local Redis leaves of the recorded keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeepRecorded {
    Yes,
    /// Kept, but a merge of them must not replace keys the peer's Redis holds.
    NoOverwrite,
    No,
}

/// Why [`NativeNode::take_over`] did nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TakeoverRefused {
    /// Writes are already served: there is no hold to lift.
    #[error("writes are served already: nothing to take over")]
    AlreadyServing,
    /// Both Redis answer: the pair decides from their histories (a hold then is a merge or a
    /// handover that ends by itself).
    #[error("both Redis are reachable: the pair decides from their histories")]
    BothReachable,
    /// Neither Redis answers: there is nothing to serve from.
    #[error("neither Redis is reachable")]
    NeitherReachable,
}

/// How many failover timeouts a side whose primary Redis is down holding unmerged writes
/// waits for it before giving those writes up and moving to the peer's Redis (an operator
/// would rather have writes back than wait for a Redis that may never return).
pub const UNMERGED_WAIT_FAILOVERS: u64 = 10;

/// One sidecar's view of the pair and its decisions.
#[derive(Debug)]
pub struct NativeNode {
    cfg: NativeConfig,
    started: u64,
    epoch: u64,
    primary: Option<Side>,
    local: Observed,
    peer_redis: Observed,
    peer: Option<(PeerReport, u64)>,
    /// The local replica was cut loose from a primary that vanished (so that a primary
    /// restarted empty cannot wipe it); writes wait until the evidence decides.
    detached: bool,
    recording: bool,
    merge: Merge,
    /// Two primaries met: the side whose Redis stays primary (decided by the higher
    /// priority, announced in its report).
    conflict_winner: Option<Side>,
    /// The peer's Redis was a linked replica of ours at the last tick.
    peer_was_linked: bool,
    /// Our primary Redis is down and the peer's is a primary holding less: writes wait.
    holding_for_local: bool,
    /// Writes wait for the peer's Redis, which was seen holding more than ours (logged once).
    holding_for_peer: bool,
    /// The furthest offset the peer's Redis was seen holding as a linked replica of ours:
    /// writes up to it were confirmed there and are recorded nowhere.
    peer_confirmed_offset: u64,
    /// The replid of our Redis's history that offset is in.
    peer_confirmed_replid: String,
    /// "Not synced, no failover" was logged.
    unsynced_logged: bool,
    /// The runs of the local and the peer's Redis the last tick decided on.
    vetted: (String, String),
    /// The local Redis finished a sync from the peer's (link up, not syncing) since it was
    /// last told to follow it or restarted: it holds the primary's data.
    local_synced: bool,
    /// The last command and when it was issued (not repeated until it could have taken effect).
    last_cmd: Option<(Command, u64)>,
    events: Vec<String>,
    failovers: u64,
    /// This sidecar is leaving (drain): hand the primary role to the peer's Redis once it
    /// holds everything ours does. `Some(since)` while under way.
    handover: Option<u64>,
    /// Since when our route holds writes for the peer's handover (decided at a tick, so
    /// published to the lanes; answered as `handover_held` two polls later, once writes sent
    /// before it had time to land).
    holding_since: Option<u64>,
    /// When the peer was first heard holding its writes for our handover.
    handover_held_at: Option<u64>,
    /// When `tick` last ran.
    last_tick: u64,
    /// The shell holds recorded keys not merged yet: writes of our clients that only our
    /// Redis holds (see [`set_unmerged`](Self::set_unmerged)).
    unmerged: bool,
    /// Since when our Redis (the primary) is down while it holds unmerged writes: the
    /// failover to the peer's waits for it, up to [`UNMERGED_WAIT_FAILOVERS`] failover
    /// timeouts.
    waiting_for_unmerged: Option<u64>,
    /// The run of the peer's Redis the running merge copies into.
    merge_peer_run: String,
    /// The recorded keys outlived a restart of our Redis whose history nothing relates to
    /// the peer's: merging them must not replace keys the peer's Redis holds.
    recorded_no_overwrite: bool,
    /// We sent `REPLICAOF NO ONE` to the peer's Redis (handover) and wait to see it primary.
    awaiting_peer_promotion: Option<u64>,
}

impl NativeNode {
    /// A sidecar that starts at `now` knowing nothing.
    pub fn new(cfg: NativeConfig, now: u64) -> NativeNode {
        NativeNode {
            cfg,
            started: now,
            epoch: 0,
            primary: None,
            local: Observed::default(),
            peer_redis: Observed::default(),
            peer: None,
            detached: false,
            recording: false,
            merge: Merge::Idle,
            conflict_winner: None,
            peer_was_linked: false,
            holding_for_local: false,
            holding_for_peer: false,
            peer_confirmed_offset: 0,
            peer_confirmed_replid: String::new(),
            unsynced_logged: false,
            handover: None,
            handover_held_at: None,
            holding_since: None,
            last_tick: now,
            unmerged: false,
            waiting_for_unmerged: None,
            merge_peer_run: String::new(),
            recorded_no_overwrite: false,
            awaiting_peer_promotion: None,
            vetted: (String::new(), String::new()),
            local_synced: false,
            last_cmd: None,
            events: Vec::new(),
            failovers: 0,
        }
    }

    /// Whether the shell holds recorded keys (written by our clients into our Redis while the
    /// peer's did not replicate it) that no merge or resync has dealt with yet. Call before
    /// each [`tick`](Self::tick).
    ///
    /// While it does and our Redis (the primary) is down, this side does not move its writes
    /// to the peer's Redis: our clients would write those keys there, on values that lack our
    /// writes, and the merge once ours returns could only keep one of the two (DESIGN.md N6).
    pub fn set_unmerged(&mut self, unmerged: bool) {
        self.unmerged = unmerged;
    }

    /// How often the shell should poll both Redis and send a heartbeat.
    pub fn poll_interval_ms(&self) -> u64 {
        (self.cfg.failover_timeout_ms / 5).clamp(20, 200)
    }

    /// The local Redis answered `INFO` (or did not).
    pub fn on_local(&mut self, now: u64, seen: Result<ReplInfo, Unreachable>) {
        self.local.record(now, seen);
    }

    /// The peer's Redis answered `INFO` (or did not).
    pub fn on_peer_redis(&mut self, now: u64, seen: Result<ReplInfo, Unreachable>) {
        self.peer_redis.record(now, seen);
    }

    /// The peer sidecar's report arrived.
    pub fn on_peer_report(&mut self, now: u64, report: PeerReport) {
        self.peer = Some((report, now));
    }

    /// The peer sidecar asks this side to hold its writes while it merges into our Redis.
    pub fn on_merge_requested(&mut self, now: u64) {
        self.merge = Merge::Hosting(now + self.cfg.merge_hold_ms);
        self.events.push("partition merge: the peer copies its writes here; writes held meanwhile".into());
    }

    /// The peer finished merging into our Redis (or gave up): writes flow again.
    pub fn on_merge_finished(&mut self) {
        if matches!(self.merge, Merge::Hosting(_)) {
            self.merge = Merge::Idle;
        }
    }

    /// The merge this side ran finished (the local Redis now follows the peer's when `ok`).
    pub fn merge_done(&mut self, now: u64, ok: bool) {
        if !matches!(self.merge, Merge::Running(_)) {
            return;
        }
        self.merge = Merge::Idle;
        self.last_cmd = None;
        let peer_run_now = self.peer_redis.info.as_ref().map(|i| i.run_id.as_str()).unwrap_or("");
        let ok = if ok && peer_run_now != self.merge_peer_run {
            // The copy went into a run the decision was not made on (the peer's Redis
            // restarted meanwhile, perhaps empty): decide again.
            self.events.push("the peer's Redis restarted during the merge: deciding again".into());
            false
        } else {
            ok
        };
        if ok {
            let peer_epoch = self.peer.as_ref().map(|(r, _)| r.epoch).unwrap_or(0);
            self.epoch = self.epoch.max(peer_epoch) + 1;
            self.primary = Some(Side::Peer);
            self.vet(Side::Peer);
            self.recording = false;
            self.recorded_no_overwrite = false;
            // The local Redis now syncs from the peer's current run on purpose: not a restart
            // to detach from.
            if let Some(i) = &self.peer_redis.info {
                self.peer_redis.prev_run_id = i.run_id.clone();
            }
            self.detached = false;
            self.events.push(format!("partition merge done: following {} (epoch {})", self.cfg.peer_id, self.epoch));
        } else {
            // Retried by the next tick (the conflict is still there).
            self.events.push(format!("partition merge failed at {now} ms; retrying"));
        }
    }

    /// The operator's `RESPLICA TAKEOVER`: stop waiting for a Redis that cannot be reached
    /// and serve from the one that can. The pair holds writes rather than lose any when the
    /// copy that holds the most is unreachable (after a restart with less, a primary Redis
    /// down holding a tail, a lone start with `lone_start = "never"`); an operator who knows
    /// that copy is gone for good lifts the hold. Writes only the unreachable copy held are
    /// lost if it never returns; if it does, it meets this side as after a partition (its
    /// keys written since are merged or counted as conflicts).
    ///
    /// Returns what was decided and the commands to carry out.
    pub fn take_over(&mut self, now: u64) -> Result<(String, Vec<Command>), TakeoverRefused> {
        if self.route(now).writes.is_some() {
            return Err(TakeoverRefused::AlreadyServing);
        }
        let l = self.local.current().cloned();
        let p = self.peer_redis.current().cloned();
        let peer_epoch = self.peer.as_ref().map_or(0, |(r, _)| r.epoch);
        let mut out = Vec::new();
        let side = match (&l, &p) {
            (Some(_), Some(_)) => return Err(TakeoverRefused::BothReachable),
            (None, None) => return Err(TakeoverRefused::NeitherReachable),
            (Some(_), None) => Side::Local,
            (None, Some(_)) => Side::Peer,
        };
        let info = l.as_ref().or(p.as_ref()).cloned().unwrap_or_default();
        self.merge = Merge::Idle;
        self.handover = None;
        self.holding_for_local = false;
        self.holding_for_peer = false;
        self.waiting_for_unmerged = None;
        self.detached = false;
        // Above every epoch the other side claimed: its older decisions cannot outrank this.
        self.epoch = self.epoch.max(peer_epoch);
        self.primary = None;
        self.set_primary(side, "operator takeover (RESPLICA TAKEOVER)");
        if side == Side::Local {
            // The other copy may return holding writes ours lacks: record ours meanwhile.
            self.recording = true;
        } else {
            // Our own Redis's tail is given up.
            self.unmerged = false;
            self.recording = false;
            out.push(Command::ClearRecorded);
        }
        if !info.master {
            out.push(Command::Promote(side));
        }
        self.failovers += 1;
        let who = match side {
            Side::Local => &self.cfg.id,
            Side::Peer => &self.cfg.peer_id,
        };
        let msg = format!(
            "operator takeover: {who}'s Redis ({}) is the primary at epoch {}; writes only the unreachable copy held are lost unless it returns",
            info.history(),
            self.epoch
        );
        self.events.push(msg.clone());
        for c in &out {
            self.last_cmd = Some((c.clone(), now));
        }
        Ok((msg, out))
    }

    /// This sidecar is about to leave (SIGTERM drain): if its Redis is the primary and the
    /// peer's is a linked replica, hold writes until the replica has everything, then make
    /// the peer's Redis the primary and ours its replica (a switchover: no acknowledged write
    /// can be lost and nobody waits for a failover timeout). Given up after the failover
    /// timeout if the replica does not catch up.
    pub fn hand_over(&mut self, now: u64) {
        if self.handover.is_none() {
            self.handover = Some(now);
        }
    }

    /// What to tell the peer.
    pub fn report(&self) -> PeerReport {
        PeerReport {
            id: self.cfg.id.clone(),
            epoch: self.epoch,
            primary: match self.primary {
                Some(Side::Local) => self.cfg.id.clone(),
                Some(Side::Peer) => self.cfg.peer_id.clone(),
                None => String::new(),
            },
            redis_up: self.local.up,
            recording: self.recording,
            merging: matches!(self.merge, Merge::Running(_)),
            priority: self.cfg.priority,
            winner: match self.conflict_winner {
                Some(Side::Local) => self.cfg.id.clone(),
                Some(Side::Peer) => self.cfg.peer_id.clone(),
                None => String::new(),
            },
            primary_run: match self.primary {
                Some(side) => self.vetted_run(side).to_string(),
                None => String::new(),
            },
            handover: self.handover.is_some() && self.primary == Some(Side::Local),
            handover_held: self
                .holding_since
                .is_some_and(|since| self.last_tick >= since + 2 * self.poll_interval_ms()),
            confirmed: self.peer_confirmed_offset,
            confirmed_replid: self.peer_confirmed_replid.clone(),
        }
    }

    /// Whether a merge of our keys into the peer's Redis may replace the keys it holds: only
    /// from a copy that forked from the peer's history at or after the point the peer saw
    /// ours hold (see [`PeerReport::confirmed`]).
    fn may_overwrite(&self, l: &ReplInfo, p: &ReplInfo) -> bool {
        // Only an offset of a history our copy shares counts (after both lost theirs, the old
        // figure says nothing about the new one).
        // Without that figure (the peer's sidecar restarted and lost it) nothing says our copy
        // holds what the peer's held: keys it holds keep their value (counted conflicts).
        if self.recorded_no_overwrite {
            return false;
        }
        let shared = |id: &str| !id.is_empty() && (l.replid == id || l.replid2 == id);
        let Some((r, _)) = self.peer.as_ref().filter(|(r, _)| shared(&r.confirmed_replid)) else {
            return false;
        };
        fork_point(l, p).is_some_and(|f| f >= r.confirmed)
    }

    /// Our Redis restarted from a snapshot: whether the keys recorded against its previous run
    /// still name the newest values of our writes. Only when the new run continues the
    /// previous run's history at least to where the peer's Redis parts from it: then each
    /// recorded key holds everything the peer's copy does, and possibly some of our writes
    /// the peer lacks (those after the snapshot are lost with it, not merged). Unknown
    /// (the peer's Redis never seen, or no common history): not kept.
    fn restart_keeps_recorded(&self, new: Option<&ReplInfo>, peer: Option<&ReplInfo>) -> KeepRecorded {
        let (Some(new), Some(old)) = (new, self.local.before_restart.as_ref()) else {
            return KeepRecorded::No;
        };
        // Where the new run stands in the previous run's history.
        let saved = if new.replid == old.replid {
            Some(new.offset)
        } else if new.replid2 == old.replid && new.second_offset > 0 {
            Some(new.second_offset as u64 - 1)
        } else {
            None
        };
        match (saved, peer.and_then(|peer| fork_point(old, peer))) {
            (Some(saved), Some(peer_holds)) if saved >= peer_holds => KeepRecorded::Yes,
            (Some(_), Some(_)) | (None, _) => KeepRecorded::No,
            // The snapshot continues our history, but nothing relates it to the peer's (its
            // history was lost in a restart of its own, or never seen): the keys are merged
            // without replacing any the peer holds (conflicts, counted).
            (Some(_), None) => KeepRecorded::NoOverwrite,
        }
    }

    /// The peer (the primary's side) is handing its role to us: our writes wait.
    fn holds_for_peer_handover(&self, now: u64) -> bool {
        self.primary == Some(Side::Peer)
            && self.peer.as_ref().is_some_and(|(r, at)| r.handover && now < *at + self.cfg.failover_timeout_ms)
    }

    /// The peer's priority: as it reports it, else as configured.
    fn peer_priority(&self) -> u32 {
        match &self.peer {
            Some((r, _)) => r.priority,
            None => self.cfg.peer_priority,
        }
    }

    /// The run of that side's Redis the last `tick` decided on (empty: none): writes go only
    /// to that run (a Redis restarted since must be compared first).
    pub fn vetted_run(&self, side: Side) -> &str {
        match side {
            Side::Local => &self.vetted.0,
            Side::Peer => &self.vetted.1,
        }
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The side whose Redis is the primary, once decided.
    pub fn primary(&self) -> Option<Side> {
        self.primary
    }

    /// Failovers this node carried out.
    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    /// Log lines about decisions taken since the last call.
    pub fn take_events(&mut self) -> Vec<String> {
        std::mem::take(&mut self.events)
    }

    /// Whether the peer sidecar was heard within `within` ms.
    pub fn peer_heard_within(&self, now: u64, within: u64) -> bool {
        self.peer.as_ref().is_some_and(|(_, at)| now.saturating_sub(*at) < within)
    }

    /// The last `INFO` of the local and the peer's Redis that answered the last poll.
    pub fn observed(&self) -> (Option<&ReplInfo>, Option<&ReplInfo>) {
        (self.local.current(), self.peer_redis.current())
    }

    /// Where requests go now.
    pub fn route(&self, now: u64) -> Route {
        let l = self.local.current();
        let p = self.peer_redis.current();
        let held = match self.merge {
            Merge::Running(_) => true,
            Merge::Hosting(until) => now < until,
            Merge::Idle => false,
        };
        let handing_over =
            (self.handover.is_some() && self.primary == Some(Side::Local)) || self.holds_for_peer_handover(now);
        let writes = match self.primary {
            _ if held || handing_over => None,
            Some(Side::Local) if l.is_some_and(|l| l.master) => Some(Side::Local),
            Some(Side::Peer) if p.is_some_and(|p| p.master) => Some(Side::Peer),
            _ => None,
        };
        let reads_local = match (self.primary, l) {
            (Some(Side::Local), Some(l)) => l.master,
            (Some(Side::Peer), Some(l)) => !l.master && l.link_up && !l.syncing,
            _ => false,
        };
        // Record while the peer's Redis is not a linked replica of ours: what it lacks then
        // may have to be merged into it later (if it takes over meanwhile).
        let peer_linked = p.is_some_and(|p| !p.master && p.link_up && !p.syncing);
        Route { writes, reads_local, recording: (self.recording || !peer_linked) && writes == Some(Side::Local) }
    }

    fn issue(&mut self, now: u64, cmd: Command, out: &mut Vec<Command>) {
        let guard = (self.cfg.failover_timeout_ms / 2).max(300);
        if let Some((last, at)) = &self.last_cmd {
            if *last == cmd && now.saturating_sub(*at) < guard {
                return;
            }
        }
        if matches!(cmd, Command::FollowPeer | Command::Merge { .. }) {
            // A (full) sync starts: until it completes the local copy is not the primary's.
            self.local_synced = false;
        }
        if cmd == Command::ClearRecorded {
            self.recorded_no_overwrite = false;
        }
        if cmd == Command::FollowPeer {
            // Compared just now: the peer's run holds at least what ours does.
            self.vet(Side::Peer);
        }
        self.last_cmd = Some((cmd.clone(), now));
        out.push(cmd);
    }

    /// Writes may go to the run of `side`'s Redis observed now (it was just compared or
    /// chosen); a later run (a restart) takes none until it is vetted again.
    fn vet(&mut self, side: Side) {
        let run = match side {
            Side::Local => self.local.current().map(|i| i.run_id.clone()),
            Side::Peer => self.peer_redis.current().map(|i| i.run_id.clone()),
        };
        if let Some(run) = run {
            match side {
                Side::Local => self.vetted.0 = run,
                Side::Peer => self.vetted.1 = run,
            }
        }
    }

    fn set_primary(&mut self, side: Side, why: &str) {
        self.vet(side);
        self.holding_for_peer = false;
        if side == Side::Peer && matches!(self.merge, Merge::Hosting(_)) {
            // The peer's merge into our Redis is moot now that the peer's is the primary; our
            // own tail is merged into it instead (a Diverged copy is never just followed).
            self.merge = Merge::Idle;
        }
        if self.primary != Some(side) {
            self.epoch += 1;
            self.primary = Some(side);
            let who = match side {
                Side::Local => &self.cfg.id,
                Side::Peer => &self.cfg.peer_id,
            };
            self.events.push(format!("primary is now {who}'s Redis (epoch {}): {why}", self.epoch));
        }
    }

    /// Decide. Call after feeding the latest observations; carry out what comes back.
    pub fn tick(&mut self, now: u64) -> Vec<Command> {
        self.last_tick = now;
        if self.holds_for_peer_handover(now) {
            self.holding_since.get_or_insert(now);
        } else {
            self.holding_since = None;
        }
        let mut out = Vec::new();
        let ft = self.cfg.failover_timeout_ms;
        if let Merge::Hosting(until) = self.merge {
            if now >= until {
                self.merge = Merge::Idle;
            }
        }
        let peer_alive = self.peer_heard_within(now, ft);
        let peer = if peer_alive { self.peer.as_ref().map(|(r, _)| r.clone()) } else { None };
        // Cut off: the peer sidecar has been silent for half the failover timeout, before it
        // could take over; from here on, writes here may have to be merged later.
        let cut_off = !self.peer_heard_within(now, ft / 2);
        let l = self.local.current().cloned();
        let p = self.peer_redis.current().cloned();
        // Our primary Redis is down holding writes of ours that no other copy has: they are
        // merged when it returns; meanwhile this side's writes do not move to the peer's Redis
        // (`set_unmerged`), for a bounded time.
        // (Nothing is unmerged once the peer's Redis holds everything ours was last seen
        // holding; and a side already following the peer's has nothing to wait for.)
        let peer_holds_ours = matches!(
            (&p, &self.local.info),
            (Some(p), Some(last)) if matches!(compare(p, last), Holds::First | Holds::Equal)
        );
        if l.is_none() && self.unmerged && peer_holds_ours {
            self.unmerged = false;
            self.issue(now, Command::ClearRecorded, &mut out);
        }
        if l.is_none() && self.unmerged && self.primary != Some(Side::Peer) {
            let since = *self.waiting_for_unmerged.get_or_insert(now);
            if now.saturating_sub(since) >= ft * UNMERGED_WAIT_FAILOVERS {
                self.events.push(format!(
                    "the local Redis has been down for {} ms holding writes no other copy has: giving them up",
                    now.saturating_sub(since)
                ));
                self.unmerged = false;
                self.recording = false;
                self.waiting_for_unmerged = None;
                self.issue(now, Command::ClearRecorded, &mut out);
            } else if now == since {
                self.events.push(
                    "the local Redis (primary) is down holding writes no other copy has: this side's writes wait for it"
                        .into(),
                );
            }
        } else {
            self.waiting_for_unmerged = None;
        }
        let waiting_for_unmerged = self.waiting_for_unmerged.is_some();
        let local_restarted = std::mem::take(&mut self.local.restarted);
        if local_restarted {
            self.local_synced = false;
        }
        if l.as_ref().is_some_and(|l| !l.master && l.link_up && !l.syncing) {
            self.local_synced = true;
            self.unsynced_logged = false;
        }
        if let (Some(l), Some(p)) = (&l, &p) {
            if l.master && !p.master && p.link_up && p.replid == l.replid {
                if self.peer_confirmed_replid != l.replid {
                    // Offsets of another history do not compare with this one's.
                    self.peer_confirmed_replid = l.replid.clone();
                    self.peer_confirmed_offset = 0;
                }
                self.peer_confirmed_offset = self.peer_confirmed_offset.max(p.offset);
            }
        }
        if self.handover.is_none() {
            self.handover_held_at = None;
        }
        if let Some(since) = self.handover {
            if self.primary == Some(Side::Local) {
                match (&l, &p) {
                    (Some(l), Some(p)) if l.master && !p.master && p.link_up && !p.syncing && peer_alive => {
                        // The peer's sidecar holds its writes (it writes into our Redis too):
                        // acknowledged after we asked, and both Redis looked at since.
                        if self.handover_held_at.is_none() {
                            self.handover_held_at =
                                self.peer.as_ref().filter(|(r, at)| r.handover_held && *at >= since).map(|(_, at)| *at);
                        }
                        let still_held = self.peer.as_ref().is_some_and(|(r, _)| r.handover_held);
                        let held_at = self.handover_held_at.filter(|_| still_held);
                        let looked_since = |o: &Observed| held_at.is_some_and(|h| o.last_ok.is_some_and(|t| t > h));
                        if looked_since(&self.local)
                            && looked_since(&self.peer_redis)
                            && p.replid == l.replid
                            && p.offset >= l.offset
                        {
                            // The replica holds every write ours took (writes are held).
                            self.handover = None;
                            self.issue(now, Command::Promote(Side::Peer), &mut out);
                            self.awaiting_peer_promotion = Some(now);
                            // Our Redis follows once the peer's is seen promoted (`follow`):
                            // REPLICAOF sent before the promotion would race it.
                            self.set_primary(Side::Peer, "handed over before this sidecar leaves");
                            return out;
                        }
                    }
                    _ => {
                        self.handover = None;
                        self.events.push("leaving: the peer's Redis is not a linked replica; no handover".into());
                    }
                }
                if self.handover.is_some() && now.saturating_sub(since) > ft {
                    self.handover = None;
                    self.events.push("leaving: the replica did not catch up in time; no handover".into());
                }
            } else {
                self.handover = None;
            }
        }
        let peer_claims = peer.as_ref().is_some_and(|r| r.primary == self.cfg.peer_id);
        let conflict = peer_claims
            && self.primary == Some(Side::Local)
            && l.as_ref().is_some_and(|l| l.master)
            && p.as_ref().is_some_and(|p| p.master);

        if conflict {
            // Two primaries met (a partition healed, or a copy came back that another
            // replaced). One side decides, so the two cannot both win or both merge: the
            // higher priority. The copy that holds everything the other does wins (N5:
            // never overwrite more with less); between diverged copies the higher priority
            // wins (N6) and the other merges the keys its clients wrote into it, then
            // follows. The decision sticks until the conflict is over.
            if self.conflict_winner.is_none() {
                let i_decide =
                    (self.cfg.priority, self.cfg.peer_id.as_str()) > (self.peer_priority(), self.cfg.id.as_str());
                if i_decide {
                    if let (Some(l), Some(p)) = (&l, &p) {
                        let winner = match compare(l, p) {
                            Holds::Second => Side::Peer,
                            Holds::First | Holds::Equal => Side::Local,
                            // Two forks of one history (a partition): the higher priority
                            // (N6); the other's writes since the fork are recorded and merged.
                            Holds::Diverged if related(l, p) => Side::Local,
                            // No common history (one restarted empty and took writes before
                            // anyone looked): the longer history, then more keys (N5).
                            Holds::Diverged => {
                                if first_should_lead(
                                    l,
                                    (self.cfg.priority, &self.cfg.id),
                                    p,
                                    (self.peer_priority(), &self.cfg.peer_id),
                                ) {
                                    Side::Local
                                } else {
                                    Side::Peer
                                }
                            }
                        };
                        self.conflict_winner = Some(winner);
                        if winner == Side::Local {
                            self.vet(Side::Local);
                            // Re-asserted: above every epoch the other side claimed, so that
                            // its reports from before the merge cannot outrank this one.
                            let theirs = peer.as_ref().map(|r| r.epoch).unwrap_or(0);
                            self.epoch = self.epoch.max(theirs) + 1;
                        }
                        let who = if winner == Side::Local { &self.cfg.id } else { &self.cfg.peer_id };
                        self.events.push(format!(
                            "two primaries: {who}'s Redis stays primary ({:?} histories)",
                            compare(l, p)
                        ));
                    }
                } else if let Some(r) = &peer {
                    self.conflict_winner = match r.winner.as_str() {
                        "" => None,
                        id if id == self.cfg.id => Some(Side::Local),
                        _ => Some(Side::Peer),
                    };
                }
            }
            if self.conflict_winner == Some(Side::Peer) && self.merge == Merge::Idle {
                let nothing_to_merge =
                    matches!((&l, &p), (Some(l), Some(p)) if matches!(compare(p, l), Holds::First | Holds::Equal));
                if nothing_to_merge {
                    // The peer's Redis holds everything ours does (ours restarted empty or
                    // from an older snapshot): copying our recorded keys from it would
                    // overwrite theirs with less (N5). Follow it.
                    self.recording = false;
                    self.conflict_winner = None;
                    self.set_primary(Side::Peer, "the peer's Redis holds everything ours does");
                    self.issue(now, Command::ClearRecorded, &mut out);
                    self.issue(now, Command::FollowPeer, &mut out);
                    return out;
                }
                self.merge = Merge::Running(now);
                self.events.push(format!(
                    "two primaries after a partition: {} stays primary; merging this side's writes into it",
                    self.cfg.peer_id
                ));
                let overwrite = matches!((&l, &p), (Some(l), Some(p)) if self.may_overwrite(l, p));
                let peer_run = p.as_ref().map(|p| p.run_id.clone()).unwrap_or_default();
                self.merge_peer_run = peer_run.clone();
                self.issue(now, Command::Merge { overwrite, peer_run }, &mut out);
            }
            if let Merge::Running(since) = self.merge {
                if now.saturating_sub(since) > ft.max(self.cfg.merge_hold_ms) * 4 {
                    // The shell lost track of it; start again.
                    self.merge = Merge::Idle;
                }
            }
            return out;
        }
        self.conflict_winner = None;
        if matches!(self.merge, Merge::Running(_)) {
            return out;
        }

        // The peer moved on (higher epoch, or equal and higher priority): take its word.
        if let Some(r) = &peer {
            let theirs = match r.primary.as_str() {
                "" => None,
                id if id == self.cfg.id => Some(Side::Local),
                _ => Some(Side::Peer),
            };
            let outranks = r.epoch > self.epoch || (r.epoch == self.epoch && self.peer_priority() > self.cfg.priority);
            // Never give up a primary that takes writes for a peer whose Redis we cannot see:
            // the conflict rule above decides once both are visible.
            // Nor while our Redis (down now) holds writes of ours the peer's lacks: they are
            // merged when it is back; writing the same keys there meanwhile would make the
            // merge choose between two of our own writes.
            let unsafe_to_follow = theirs == Some(Side::Peer)
                && self.primary == Some(Side::Local)
                && ((l.as_ref().is_some_and(|l| l.master) && p.as_ref().is_none_or(|p| p.master))
                    || (l.is_none() && (self.recording || waiting_for_unmerged)));
            // Their decision names a run of that Redis; the run we see now must be the one.
            let same_run = match theirs {
                Some(Side::Local) => l.as_ref().is_some_and(|l| l.run_id == r.primary_run),
                Some(Side::Peer) => p.as_ref().is_some_and(|p| p.run_id == r.primary_run),
                None => false,
            };
            if outranks && theirs.is_some() && theirs != self.primary && !unsafe_to_follow && same_run {
                self.epoch = r.epoch;
                self.primary = theirs;
                if let Some(side) = theirs {
                    self.vet(side);
                }
                self.events
                    .push(format!("following {}'s decision: primary is {} (epoch {})", r.id, r.primary, r.epoch));
            } else if r.epoch > self.epoch && (same_run || theirs.is_none()) {
                // A decision about a run we cannot see (yet) keeps its epoch above ours, so
                // that it can still be adopted once that run is seen.
                self.epoch = r.epoch;
            }
        }

        // Our Redis restarted (empty or from a snapshot of unknown age) while it was the
        // primary: compare both histories again before sending it writes (N5); a copy that
        // came back holding less must not take writes and then win as "diverged".
        // (The peer's Redis as last seen: once apart, a fork only moves further away.)
        let keep = if local_restarted {
            self.restart_keeps_recorded(l.as_ref(), self.peer_redis.info.as_ref())
        } else {
            KeepRecorded::Yes
        };
        if keep == KeepRecorded::No {
            // The keys recorded were written to the previous run: what this one holds of them
            // is older than what the peer's Redis holds (a snapshot from before the point the
            // two histories part, or nothing); copying it in a merge could only overwrite
            // newer values.
            self.recording = false;
            self.issue(now, Command::ClearRecorded, &mut out);
        } else if keep == KeepRecorded::NoOverwrite {
            self.recorded_no_overwrite = true;
        }
        if local_restarted {
            if self.primary == Some(Side::Local) {
                self.primary = None;
                self.events.push("the local Redis restarted: comparing both histories before it takes writes".into());
            }
        }
        // Our Redis replicating the peer's: the peer's run is the history ours holds.
        if self.primary == Some(Side::Peer) && l.as_ref().is_some_and(|l| !l.master && l.link_up) {
            self.vet(Side::Peer);
        }
        let since = self.started;
        if self.primary.is_none() {
            self.form(now, &l, &p, peer_alive, &mut out);
        }
        match self.primary {
            None => {}
            Some(Side::Local) => {
                if l.is_some() {
                    self.holding_for_local = false;
                }
                match &l {
                    Some(l) if !l.master => self.issue(now, Command::Promote(Side::Local), &mut out),
                    Some(_) => {}
                    None => {
                        // Our Redis is gone: the peer's sidecar promotes its own once it sees
                        // that; if that sidecar is silent too, promote its Redis from here.
                        if self.local.down_for(now, since) >= ft {
                            // Only to a copy that holds what ours held, or that was promoted
                            // from our history (our tail beyond that point is recorded): a
                            // stale primary would take writes on a history that loses ours.
                            let confirmed = self.peer_confirmed_offset;
                            let follows_ours = |p: &ReplInfo| {
                                self.local.info.as_ref().is_none_or(|last| {
                                    matches!(compare(p, last), Holds::First | Holds::Equal)
                                        || (p.second_offset > 0
                                            && p.replid2 == last.replid
                                            && p.second_offset as u64 > confirmed)
                                })
                            };
                            if waiting_for_unmerged {
                                // Writes wait for ours (see `set_unmerged`).
                            } else if p.as_ref().is_some_and(|p| p.master && !follows_ours(p)) {
                                if !self.holding_for_local {
                                    self.holding_for_local = true;
                                    self.events.push(
                                        "the local Redis (primary) is down and the peer's holds less: writes wait for ours"
                                            .into(),
                                    );
                                }
                            } else if let Some(p) = &p {
                                if p.master {
                                    self.set_primary(Side::Peer, "the local Redis is down and the peer's is primary");
                                } else if !peer_alive && !p.syncing {
                                    // (A replica still in its full sync holds whatever it had
                                    // before, not ours.)
                                    self.issue(now, Command::Promote(Side::Peer), &mut out);
                                    self.set_primary(
                                        Side::Peer,
                                        "the local Redis is down and the peer's sidecar silent",
                                    );
                                    self.failovers += 1;
                                }
                            }
                        }
                    }
                }
                if cut_off && !self.recording && self.primary == Some(Side::Local) {
                    self.recording = true;
                    self.events.push(format!(
                        "{} unheard for {} ms: recording the keys written here until it returns",
                        self.cfg.peer_id,
                        ft / 2
                    ));
                }
            }
            Some(Side::Peer) => self.follow(now, &l, &p, peer.as_ref(), &mut out),
        }

        // Everything the peer's Redis lacks is replicated again: forget the recorded keys.
        let linked =
            self.primary == Some(Side::Local) && p.as_ref().is_some_and(|p| !p.master && p.link_up && !p.syncing);
        if linked && peer_alive && !cut_off && (self.recording || !self.peer_was_linked) {
            if self.recording {
                self.events.push("the peer's Redis replicates from here again: recorded keys dropped".into());
            }
            self.recording = false;
            self.issue(now, Command::ClearRecorded, &mut out);
        }
        self.peer_was_linked = linked;
        out
    }

    /// No primary decided yet (start).
    fn form(&mut self, now: u64, l: &Option<ReplInfo>, p: &Option<ReplInfo>, peer_alive: bool, out: &mut Vec<Command>) {
        let ft = self.cfg.failover_timeout_ms;
        match (l, p) {
            (Some(_), Some(_)) if self.peer.is_none() && now.saturating_sub(self.started) < ft => {
                // Wait for the peer's first report (its priority) before comparing.
            }
            (Some(l), Some(p)) => {
                let side = if l.master && !p.master && p.link_up {
                    Side::Local
                } else if p.master && !l.master && l.link_up {
                    Side::Peer
                } else if first_should_lead(
                    l,
                    (self.cfg.priority, &self.cfg.id),
                    p,
                    (self.peer_priority(), &self.cfg.peer_id),
                ) {
                    Side::Local
                } else {
                    Side::Peer
                };
                self.set_primary(side, "compared both Redis's replication histories");
                if side == Side::Local && !l.master {
                    self.issue(now, Command::Promote(Side::Local), out);
                }
            }
            (Some(l), None) => {
                let waited = self.peer_redis.down_for(now, self.started) >= ft;
                // The peer's Redis was seen holding more than ours holds now (ours restarted
                // empty or from an older snapshot while this sidecar ran): taking writes on ours
                // would fork from less and a later merge would overwrite the newer values (N5).
                // Wait for the peer's Redis instead, however long it takes.
                let peer_held_more = self
                    .peer_redis
                    .info
                    .as_ref()
                    .is_some_and(|last| !matches!(compare(l, last), Holds::First | Holds::Equal));
                // The peer's sidecar says, in a report heard just now, that its Redis is down.
                let peer_confirms_down =
                    self.peer_heard_within(now, ft / 2) && self.peer.as_ref().is_some_and(|(r, _)| !r.redis_up);
                // Even when the peer's sidecar says its Redis is down: down is not gone, and it
                // may come back holding the writes ours lacks.
                if waited && peer_held_more {
                    if !self.holding_for_peer {
                        self.holding_for_peer = true;
                        self.events.push(format!(
                            "{}'s Redis is unreachable and was seen holding more than ours: writes wait for it",
                            self.cfg.peer_id
                        ));
                    }
                } else if waited && !peer_alive && self.cfg.lone_start == LoneStart::AfterTimeout {
                    self.set_primary(Side::Local, "the peer's sidecar and Redis are unreachable (lone start)");
                    self.recording = true;
                    if !l.master {
                        self.issue(now, Command::Promote(Side::Local), out);
                    }
                } else if waited && peer_confirms_down && l.master {
                    // The peer's sidecar is up and its Redis down: ours is the only copy.
                    self.set_primary(Side::Local, "the peer's Redis is down");
                }
            }
            (None, Some(_)) if self.waiting_for_unmerged.is_some() => {}
            (None, Some(p)) => {
                if p.master {
                    self.set_primary(Side::Peer, "the local Redis is down and the peer's is primary");
                } else if self.local.down_for(now, self.started) >= ft && !peer_alive {
                    self.issue(now, Command::Promote(Side::Peer), out);
                    self.set_primary(Side::Peer, "the local Redis is down and the peer's sidecar silent");
                }
            }
            (None, None) => {}
        }
    }

    /// The peer's Redis is the primary: keep the local one replicating it, fail over when it
    /// is gone, take over when it came back holding less.
    fn follow(
        &mut self,
        now: u64,
        l: &Option<ReplInfo>,
        p: &Option<ReplInfo>,
        peer: Option<&PeerReport>,
        out: &mut Vec<Command>,
    ) {
        let ft = self.cfg.failover_timeout_ms;
        if self.holding_since.is_some() {
            // The peer is handing its role to us: our Redis may already be promoted while
            // its decision is on the way; following its Redis now would undo the handover.
            return;
        }
        if let Some(since) = self.awaiting_peer_promotion {
            // We promoted the peer's Redis: looks taken before that took effect show it a
            // replica still, and acting on them would undo the decision.
            if p.as_ref().is_some_and(|p| p.master) || now >= since + ft {
                self.awaiting_peer_promotion = None;
            } else {
                return;
            }
        }
        let restarted = self
            .peer_redis
            .info
            .as_ref()
            .is_some_and(|i| !self.peer_redis.prev_run_id.is_empty() && i.run_id != self.peer_redis.prev_run_id);
        match (l, p) {
            (Some(l), Some(p)) if p.master => {
                if l.master {
                    let mut holds = compare(l, p);
                    // The peer's Redis was promoted from our history (a failover while ours
                    // was paused or cut off) and ours holds a tail past that point. The peer's
                    // may not have written yet at this look, but it is the elected primary and
                    // takes writes now: our tail is merged into it (a fork), it is not a copy
                    // that "holds less" to be replaced.
                    let successor = p.second_offset > 0 && p.replid2 == l.replid && l.offset >= p.second_offset as u64;
                    if holds == Holds::First && successor {
                        holds = Holds::Diverged;
                    }
                    let diverged_fork = holds == Holds::Diverged && related(l, p);
                    match holds {
                        // Two forks of one history: ours merges its tail into the primary
                        // (below) instead of becoming a second primary on a longer tail.
                        Holds::First | Holds::Diverged
                            if !diverged_fork
                                && first_should_lead(
                                    l,
                                    (self.cfg.priority, &self.cfg.id),
                                    p,
                                    (self.peer_priority(), &self.cfg.peer_id),
                                ) =>
                        {
                            // The primary came back holding less (restarted empty or from an
                            // old snapshot): ours is the copy to keep.
                            self.detached = false;
                            self.failovers += 1;
                            let why = format!(
                                "the peer's Redis holds less than ours (ours {}, the peer's {} seen {} ms ago)",
                                l.history(),
                                p.history(),
                                now.saturating_sub(self.peer_redis.last_ok.unwrap_or(0))
                            );
                            self.set_primary(Side::Local, &why);
                        }
                        Holds::Diverged if !matches!(self.merge, Merge::Running(_)) => {
                            // Ours took writes the primary lacks (it was paused or cut off while
                            // the peer's was promoted): merge them like a partition's (N6)
                            // instead of letting a full sync drop them.
                            self.detached = false;
                            self.merge = Merge::Running(now);
                            self.events.push(format!(
                                "the local Redis holds writes {}'s lacks: merging them into it before following",
                                self.cfg.peer_id
                            ));
                            let overwrite = self.may_overwrite(l, p);
                            self.merge_peer_run = p.run_id.clone();
                            self.issue(now, Command::Merge { overwrite, peer_run: p.run_id.clone() }, out);
                        }
                        // Our merge into it is running: a full sync now would drop our tail.
                        Holds::Diverged => {}
                        _ => {
                            self.detached = false;
                            // Compared just now: this run of the peer's Redis is the one to follow.
                            self.peer_redis.prev_run_id = p.run_id.clone();
                            self.issue(now, Command::FollowPeer, out);
                        }
                    }
                } else if !l.link_up && restarted && !self.detached {
                    // The primary restarted: do not let it replace our data before comparing.
                    self.detached = true;
                    self.peer_redis.prev_run_id = p.run_id.clone();
                    self.events
                        .push("the primary Redis restarted: replica detached until histories are compared".into());
                    self.issue(now, Command::Promote(Side::Local), out);
                }
            }
            (Some(l), Some(p)) => {
                // Neither is serving as primary (both replicas).
                if !l.master {
                    if first_should_lead(
                        l,
                        (self.cfg.priority, &self.cfg.id),
                        p,
                        (self.peer_priority(), &self.cfg.peer_id),
                    ) {
                        self.set_primary(Side::Local, "both Redis were replicas");
                        self.issue(now, Command::Promote(Side::Local), out);
                    } else if peer.is_none() {
                        self.issue(now, Command::Promote(Side::Peer), out);
                    }
                } else if !p.link_up
                    && first_should_lead(
                        l,
                        (self.cfg.priority, &self.cfg.id),
                        p,
                        (self.peer_priority(), &self.cfg.peer_id),
                    )
                {
                    // Ours is detached and the peer's is a replica of nobody reachable (and
                    // holds no more than ours: if it does, its sidecar promotes it).
                    self.set_primary(Side::Local, "the peer's Redis is a replica that cannot sync");
                } else if p.link_up && !p.syncing && p.replid == l.replid && compare(p, l) != Holds::First {
                    // The peer's Redis replicates ours (its sidecar made it, after deciding at
                    // a lower epoch than ours): ours is the primary in fact, holding everything
                    // the peer's does.
                    self.set_primary(Side::Local, "the peer's Redis replicates ours");
                } else if !p.syncing && compare(p, l) == Holds::First {
                    // Ours came back holding less (restarted from an old snapshot) and the
                    // peer's, still configured as its replica, holds more. Its sidecar would
                    // detach it, but may be dead without our knowing yet, and the replica
                    // resyncs from ours within a second, dropping what only it holds:
                    // promote it from here too (the same REPLICAOF NO ONE its sidecar sends;
                    // ours then follows it).
                    self.issue(now, Command::Promote(Side::Peer), out);
                }
            }
            (Some(l), None) => {
                if !l.master && !self.detached && self.peer_redis.refused {
                    // The primary's process is gone: detach before it can come back empty and
                    // wipe this copy by a full sync.
                    self.detached = true;
                    self.events.push("the primary Redis refused connections: replica detached".into());
                    self.issue(now, Command::Promote(Side::Local), out);
                }
                let gone_for = self.peer_redis.down_for(now, self.started);
                let confirmed = peer.is_none_or(|r| !r.redis_up);
                // Only a replica that synced from this primary holds its data: one still in
                // (or never past) its first full sync holds whatever it had before.
                let synced = self.local_synced;
                if gone_for >= ft && confirmed && !synced && !self.unsynced_logged {
                    self.unsynced_logged = true;
                    self.events.push(
                        "the primary Redis is unreachable but ours never finished syncing from it: no failover; writes wait"
                            .into(),
                    );
                }
                if gone_for >= ft && confirmed && synced {
                    self.failovers += 1;
                    self.detached = false;
                    self.set_primary(Side::Local, "failover: the primary Redis is unreachable");
                    if peer.is_none() {
                        self.recording = true;
                    }
                    if !l.master {
                        self.issue(now, Command::Promote(Side::Local), out);
                    }
                }
            }
            (None, _) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(master: bool, replid: &str, offset: u64) -> ReplInfo {
        ReplInfo {
            run_id: format!("run-{replid}"),
            master,
            replid: replid.into(),
            replid2: "0".repeat(40),
            offset,
            second_offset: -1,
            link_up: !master,
            syncing: false,
            keys: offset / 10,
            ..Default::default()
        }
    }

    #[test]
    fn parses_info() {
        let text = "# Server\r\nrun_id:abc\r\n# Replication\r\nrole:slave\r\nmaster_link_status:up\r\nmaster_sync_in_progress:0\r\nmaster_replid:r1\r\nmaster_replid2:r0\r\nmaster_repl_offset:1234\r\nsecond_repl_offset:100\r\n# Keyspace\r\ndb0:keys=3,expires=0,avg_ttl=0\r\ndb2:keys=4,expires=1,avg_ttl=5\r\n";
        let i = ReplInfo::parse(text).unwrap();
        assert!(!i.master && i.link_up && !i.syncing);
        assert_eq!(
            (i.replid.as_str(), i.replid2.as_str(), i.offset, i.second_offset, i.keys),
            ("r1", "r0", 1234, 100, 7)
        );
        assert_eq!(i.run_id, "abc");
        assert!(ReplInfo::parse("# Server\r\nrun_id:x\r\n").is_none());
    }

    #[test]
    fn histories_compare() {
        let a = info(true, "A", 1000);
        let b = info(false, "A", 900);
        assert_eq!(compare(&a, &b), Holds::First);
        assert_eq!(compare(&b, &a), Holds::Second);
        // b promoted after 900 and wrote more: it continues A's history.
        let mut b2 = info(true, "B", 1500);
        b2.replid2 = "A".into();
        b2.second_offset = 901;
        assert_eq!(compare(&b2, &b), Holds::First);
        // a had 1000 > 900: a and b2 diverged.
        assert_eq!(compare(&a, &b2), Holds::Diverged);
        // A promoted replica that wrote nothing since holds exactly its old history.
        let mut b3 = info(true, "B", 900);
        b3.replid2 = "A".into();
        b3.second_offset = 901;
        assert_eq!(compare(&a, &b3), Holds::First);
        // Restarted empty: holds nothing.
        let empty = ReplInfo { run_id: "new".into(), master: true, replid: "C".into(), ..Default::default() };
        assert_eq!(compare(&b, &empty), Holds::First);
        assert!(!first_should_lead(&empty, (100, "a"), &b, (90, "b")));
        // Equal copies: the primary, then priority.
        assert!(first_should_lead(&info(true, "A", 5), (90, "b"), &info(false, "A", 5), (100, "a")));
        let e1 = ReplInfo { master: true, replid: "X".into(), ..Default::default() };
        let e2 = ReplInfo { master: true, replid: "Y".into(), ..Default::default() };
        assert!(first_should_lead(&e1, (100, "a"), &e2, (90, "b")));
        assert!(!first_should_lead(&e2, (90, "b"), &e1, (100, "a")));
    }

    fn cfg(id: &str, prio: u32, peer: &str, peer_prio: u32) -> NativeConfig {
        NativeConfig {
            id: id.into(),
            priority: prio,
            peer_id: peer.into(),
            peer_priority: peer_prio,
            failover_timeout_ms: 500,
            lone_start: LoneStart::AfterTimeout,
            merge_hold_ms: 2000,
        }
    }

    #[test]
    fn forms_on_the_higher_priority_when_both_are_empty() {
        let mut a = NativeNode::new(cfg("a", 100, "b", 90), 0);
        let mut b = NativeNode::new(cfg("b", 90, "a", 100), 0);
        let ea = ReplInfo { master: true, replid: "X".into(), run_id: "ra".into(), ..Default::default() };
        let eb = ReplInfo { master: true, replid: "Y".into(), run_id: "rb".into(), ..Default::default() };
        a.on_local(10, Ok(ea.clone()));
        a.on_peer_redis(10, Ok(eb.clone()));
        b.on_local(10, Ok(eb));
        b.on_peer_redis(10, Ok(ea));
        // Neither compares before hearing the other's priority (or the failover timeout).
        assert!(a.tick(10).is_empty() && a.primary().is_none());
        let (ra, rb) = (a.report(), b.report());
        a.on_peer_report(10, rb);
        b.on_peer_report(10, ra);
        assert!(a.tick(10).is_empty());
        assert_eq!(b.tick(10), vec![Command::FollowPeer]);
        assert_eq!(a.primary(), Some(Side::Local));
        assert_eq!(b.primary(), Some(Side::Peer));
        assert_eq!(a.route(10).writes, Some(Side::Local));
        assert_eq!(b.route(10).writes, Some(Side::Peer));
        assert!(!b.route(10).reads_local, "b's Redis does not replicate yet");
    }

    #[test]
    fn a_leaving_primary_hands_over_once_the_peer_holds_and_the_replica_caught_up() {
        let mut a = NativeNode::new(cfg("a", 100, "b", 90), 0);
        let mut b = NativeNode::new(cfg("b", 90, "a", 100), 0);
        let mut t = 0;
        let step = |a: &mut NativeNode, b: &mut NativeNode, t: u64, la: ReplInfo, lb: ReplInfo| {
            a.on_local(t, Ok(la.clone()));
            a.on_peer_redis(t, Ok(lb.clone()));
            b.on_local(t, Ok(lb));
            b.on_peer_redis(t, Ok(la));
            let (ra, rb) = (a.report(), b.report());
            a.on_peer_report(t, rb);
            b.on_peer_report(t, ra);
            (a.tick(t), b.tick(t))
        };
        let la = info(true, "A", 100);
        let lb = info(false, "A", 100);
        for _ in 0..3 {
            t += 100;
            step(&mut a, &mut b, t, la.clone(), lb.clone());
        }
        assert_eq!(a.primary(), Some(Side::Local));
        assert_eq!(b.route(t).writes, Some(Side::Peer));
        a.hand_over(t);
        let mut switched = false;
        for _ in 0..10 {
            t += 100;
            let (ca, _) = step(&mut a, &mut b, t, la.clone(), lb.clone());
            assert_eq!(a.route(t).writes, None, "a holds while handing over");
            if ca.contains(&Command::Promote(Side::Peer)) {
                switched = true;
                break;
            }
            assert_eq!(b.route(t).writes, None, "b holds for the handover");
        }
        assert!(switched, "a never handed over");
        assert_eq!(a.primary(), Some(Side::Peer));
        // b's Redis promoted, a's following it: b takes a's decision.
        let pb = ReplInfo { replid: "B".into(), replid2: "A".into(), second_offset: 101, ..info(true, "B", 100) };
        let pb = ReplInfo { run_id: lb.run_id.clone(), ..pb };
        let fa = ReplInfo { run_id: la.run_id.clone(), link_up: true, ..info(false, "B", 100) };
        for _ in 0..3 {
            t += 100;
            step(&mut a, &mut b, t, fa.clone(), pb.clone());
        }
        assert_eq!(b.primary(), Some(Side::Local));
        assert_eq!(b.route(t).writes, Some(Side::Local));
        assert_eq!(a.route(t).writes, Some(Side::Peer));
    }

    #[test]
    fn fails_over_only_when_the_primary_redis_is_gone() {
        let mut b = NativeNode::new(cfg("b", 90, "a", 100), 0);
        let pa = info(true, "A", 100);
        let lb = info(false, "A", 100);
        b.on_local(0, Ok(lb.clone()));
        b.on_peer_redis(0, Ok(pa.clone()));
        b.on_peer_report(
            0,
            PeerReport { id: "a".into(), epoch: 1, primary: "a".into(), redis_up: true, ..Default::default() },
        );
        b.tick(0);
        assert_eq!(b.primary(), Some(Side::Peer));
        // a's sidecar dies, its Redis lives: no failover.
        for t in (100..=3000).step_by(100) {
            b.on_local(t, Ok(lb.clone()));
            b.on_peer_redis(t, Ok(pa.clone()));
            assert!(b.tick(t).is_empty());
        }
        assert_eq!(b.route(3000).writes, Some(Side::Peer));
        // a's Redis is killed: detach at once, fail over after the timeout.
        b.on_peer_redis(3100, Err(Unreachable::Refused));
        assert_eq!(b.tick(3100), vec![Command::Promote(Side::Local)]);
        assert_eq!(b.route(3100).writes, None);
        let mut promoted = lb.clone();
        promoted.master = true;
        for t in (3200..3500).step_by(100) {
            b.on_local(t, Ok(promoted.clone()));
            b.on_peer_redis(t, Err(Unreachable::Refused));
            b.tick(t);
            assert_eq!(b.primary(), Some(Side::Peer), "not before the timeout ({t})");
        }
        b.on_peer_redis(3600, Err(Unreachable::Refused));
        b.on_local(3600, Ok(promoted.clone()));
        b.tick(3600);
        assert_eq!(b.primary(), Some(Side::Local));
        assert_eq!(b.route(3600).writes, Some(Side::Local));
        assert!(b.route(3600).recording, "the peer sidecar is silent: it may be a partition");
    }

    /// a is primary with writes of its own that b's Redis lacks (recorded); a's Redis goes
    /// down and b's sidecar promotes b's from a's history. a does not move its writes to b's
    /// Redis while its own holds that tail (they would be written on values lacking it), until
    /// UNMERGED_WAIT_FAILOVERS failover timeouts have passed; then it gives the tail up.
    #[test]
    fn a_primary_down_with_unmerged_writes_holds_instead_of_following() {
        let mut a = NativeNode::new(cfg("a", 100, "b", 90), 0);
        let la = info(true, "A", 200);
        let lb = info(false, "A", 100);
        a.on_local(0, Ok(la.clone()));
        a.on_peer_redis(0, Ok(lb.clone()));
        a.on_peer_report(0, PeerReport { id: "b".into(), priority: 90, ..Default::default() });
        a.tick(0);
        a.tick(600);
        assert_eq!(a.primary(), Some(Side::Local));
        a.set_unmerged(true);
        let pb = ReplInfo { replid2: "A".into(), second_offset: 101, ..info(true, "B", 150) };
        let report = || PeerReport {
            id: "b".into(),
            priority: 90,
            epoch: 2,
            primary: "b".into(),
            primary_run: pb.run_id.clone(),
            redis_up: true,
            ..Default::default()
        };
        let mut t = 700;
        while t < 700 + 500 * UNMERGED_WAIT_FAILOVERS - 100 {
            a.on_local(t, Err(Unreachable::Refused));
            a.on_peer_redis(t, Ok(pb.clone()));
            a.on_peer_report(t, report());
            a.tick(t);
            assert_eq!(a.primary(), Some(Side::Local), "at {t}: must not follow while our Redis holds the tail");
            assert_eq!(a.route(t).writes, None);
            t += 100;
        }
        let mut gave_up = false;
        for _ in 0..5 {
            t += 100;
            a.on_local(t, Err(Unreachable::Refused));
            a.on_peer_redis(t, Ok(pb.clone()));
            a.on_peer_report(t, report());
            gave_up |= a.tick(t).contains(&Command::ClearRecorded);
            a.set_unmerged(false);
        }
        assert!(gave_up, "the tail is given up after the bounded wait");
        assert_eq!(a.primary(), Some(Side::Peer));
        assert_eq!(a.route(t).writes, Some(Side::Peer));
    }

    /// A local Redis restarted from a snapshot keeps the recorded keys when the snapshot holds
    /// the history at least to where the peer's Redis parts from it; otherwise they are
    /// dropped (the snapshot's values are older than the peer's).
    #[test]
    fn a_restart_from_a_recent_snapshot_keeps_the_recorded_keys() {
        for (saved_at, kept) in [(180u64, true), (90, false)] {
            let mut a = NativeNode::new(cfg("a", 100, "b", 90), 0);
            let la = info(true, "A", 200);
            // b's Redis was promoted from A at 120.
            let pb = ReplInfo { replid2: "A".into(), second_offset: 121, ..info(true, "B", 150) };
            a.on_local(0, Ok(la.clone()));
            a.on_peer_redis(0, Ok(pb.clone()));
            a.on_peer_report(0, PeerReport { id: "b".into(), priority: 90, ..Default::default() });
            a.tick(0);
            a.tick(600);
            a.set_unmerged(true);
            // Restarted from a snapshot: a new replid continuing A up to `saved_at`.
            let restarted = ReplInfo {
                run_id: "run-a2".into(),
                replid: "A2".into(),
                replid2: "A".into(),
                second_offset: saved_at as i64 + 1,
                ..info(true, "A2", saved_at)
            };
            a.on_local(700, Ok(restarted));
            a.on_peer_redis(700, Ok(pb.clone()));
            let cmds = a.tick(700);
            assert_eq!(!cmds.contains(&Command::ClearRecorded), kept, "snapshot at {saved_at}: {cmds:?}");
        }
    }

    #[test]
    fn takeover_lifts_only_a_hold_on_an_unreachable_copy() {
        let mut a = NativeNode::new(cfg("a", 100, "b", 90), 0);
        assert_eq!(a.take_over(0).unwrap_err(), TakeoverRefused::NeitherReachable);
        a.on_local(0, Ok(info(true, "A", 10)));
        a.on_peer_redis(0, Ok(info(false, "A", 10)));
        assert_eq!(a.take_over(0).unwrap_err(), TakeoverRefused::BothReachable);
        // The peer's Redis gone, ours a replica of it that never synced: writes wait.
        let mut b = NativeNode::new(cfg("b", 90, "a", 100), 0);
        b.on_local(0, Ok(info(false, "A", 10)));
        b.on_peer_redis(0, Err(Unreachable::Refused));
        b.tick(0);
        assert_eq!(b.route(0).writes, None);
        let (msg, cmds) = b.take_over(10).expect("takeover");
        assert!(msg.contains("operator takeover"), "{msg}");
        assert_eq!(cmds, vec![Command::Promote(Side::Local)]);
        assert_eq!(b.primary(), Some(Side::Local));
        // Promoted (same run, a new replid).
        b.on_local(20, Ok(ReplInfo { run_id: "run-A".into(), ..info(true, "B", 10) }));
        b.on_peer_redis(20, Err(Unreachable::Refused));
        b.tick(20);
        assert_eq!(b.route(20).writes, Some(Side::Local));
        assert!(b.route(20).recording, "the other copy may return with writes ours lacks");
        assert_eq!(b.take_over(30).unwrap_err(), TakeoverRefused::AlreadyServing);
    }
}

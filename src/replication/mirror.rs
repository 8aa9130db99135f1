//! Mirror mode's control plane, without I/O: every decision the mirror shell
//! (`server::replica`) used to make inline. It owns [`Membership`] (who writes) and what the
//! shell needs beyond it to act on a role:
//! - **hold / forward / sequence**: where a request on the writer path goes now ([`route`]);
//! - **the reference copy**: on taking the writer role, whose Redis the others are rebuilt
//!   from, and which replicas start enabled ([`become_writer`]);
//! - **peer freshness and rebuilds**: which replica streams the writer keeps enabled, and
//!   which must be rebuilt because their sidecar restarted ([`stream_changes`]);
//! - **local-read gating**: whether a follower may read its own Redis ([`local_reads`]).
//!
//! Time is passed in (monotonic ms); it never reads a clock, opens a socket or logs. The
//! [`Sequencer`](super::sequencer::Sequencer) stays the writer's data path.
//!
//! [`route`]: MirrorControl::route
//! [`become_writer`]: MirrorControl::become_writer
//! [`stream_changes`]: MirrorControl::stream_changes
//! [`local_reads`]: MirrorControl::local_reads

use std::collections::{HashMap, HashSet};

use super::membership::{Decision, Membership, Report, Role};
use super::sequencer::ReplicaState;

/// Where a request on the writer path goes now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriterPath {
    /// This node is the writer: into the sequencer.
    Sequence,
    /// Over the peer link to this writer.
    Forward(String),
    /// Wait (no writer known, a handover or yield under way, or forwards still coming back).
    Hold,
}

/// Where a request another node forwarded goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardedPath {
    Sequence,
    Hold,
    /// Answer "not the writer": the sender routes it again.
    NotWriter,
}

/// What the shell sets up on taking the writer role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterPlan {
    /// Our own Redis is the reference copy (else it is rebuilt from a peer's).
    pub local_trusted: bool,
    /// Per stream (0 = our Redis, then the peers in configuration order): start with a full
    /// rebuild.
    pub rebuild: Vec<bool>,
    /// Per stream: start enabled (a peer's only while its sidecar is live and follows).
    pub enabled: Vec<bool>,
    /// Requests forwarded to the old writer and not answered fail (a failover: their fate is
    /// unknown); after a handover they come back and are waited for.
    pub fail_forwards: bool,
}

/// A change to one replica stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamChange {
    /// 1-based: stream `i` is peer `i - 1`.
    pub stream: usize,
    pub enable: bool,
    /// Enable with a full rebuild (the peer's sidecar restarted since we last wrote to it).
    pub rebuild: bool,
}

/// Mirror mode's decisions for one node.
#[derive(Debug)]
pub struct MirrorControl {
    pub members: Membership,
    failover_timeout_ms: u64,
    /// Peer boot ids seen when their streams were last enabled (continuity check).
    known_boot: HashMap<String, u64>,
    /// Peers that yielded to us and may still report themselves as writer for a moment:
    /// their streams stay enabled (the merge is running on them).
    yielded: HashSet<String>,
    /// When this node last started following a writer: only a report heard after it may
    /// say our Redis is in sync.
    followed_at: u64,
    /// The last report from our writer said our Redis was in sync (kept after the writer
    /// goes silent: it decides whether our Redis may be the reference after a failover).
    local_was_in_sync: bool,
    /// Handing over or yielding: new writer-path requests wait.
    draining: bool,
}

impl MirrorControl {
    /// `peers`: (id, priority) in configuration order (stream `i + 1` is peer `i`).
    pub fn new(id: &str, priority: u32, boot: u64, peers: &[(String, u32)], failover_timeout_ms: u64) -> Self {
        MirrorControl {
            members: Membership::new(id, priority, boot, peers, failover_timeout_ms, 0),
            failover_timeout_ms,
            known_boot: HashMap::new(),
            yielded: HashSet::new(),
            followed_at: 0,
            local_was_in_sync: false,
            draining: false,
        }
    }

    pub fn role(&self) -> Role {
        self.members.role
    }

    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// A handover or yield starts (`true`) or ends: no new membership decisions meanwhile,
    /// and writer-path requests wait.
    pub fn set_draining(&mut self, on: bool) {
        self.draining = on;
        self.members.busy = on;
    }

    /// A peer's heartbeat.
    pub fn heard(&mut self, report: Report, now: u64) {
        self.members.heard(report, now);
    }

    /// The membership decision for now, if any.
    pub fn tick(&mut self, now: u64) -> Option<Decision> {
        self.members.tick(now)
    }

    /// Where one of our clients' requests goes. `forwards_in_flight`: requests forwarded to
    /// the previous writer are still coming back (just after a handover): ours wait behind
    /// them.
    pub fn route(&self, forwards_in_flight: bool) -> WriterPath {
        if self.draining {
            return WriterPath::Hold;
        }
        match (self.members.role, &self.members.writer) {
            (Role::Writer, _) if forwards_in_flight => WriterPath::Hold,
            (Role::Writer, _) => WriterPath::Sequence,
            (_, Some(w)) => WriterPath::Forward(w.clone()),
            (_, None) => WriterPath::Hold,
        }
    }

    /// Where a request a follower forwarded goes: sequenced at once (not behind our own held
    /// requests: after a handover those may be waiting for exactly these).
    pub fn route_forwarded(&self) -> ForwardedPath {
        if self.draining {
            ForwardedPath::Hold
        } else if self.members.role == Role::Writer {
            ForwardedPath::Sequence
        } else {
            ForwardedPath::NotWriter
        }
    }

    /// Start following `writer`. Reads stop using the local Redis until the writer reports
    /// it in sync (see [`local_reads`](Self::local_reads)).
    pub fn follow(&mut self, writer: &str, now: u64) {
        self.members.follow(writer);
        self.followed_at = now;
    }

    /// Take the writer role. `local_in_sync`: the local Redis was in sync when the role
    /// came (as last published).
    pub fn become_writer(&mut self, epoch: u64, handover: bool, local_in_sync: bool, now: u64) -> WriterPlan {
        // The reference copy: our own Redis, unless we were following a writer that did not
        // report it in sync (then the peers' Redis are, and ours is rebuilt from them).
        let local_trusted = handover || self.followed_at == 0 || local_in_sync || self.local_was_in_sync;
        let mut rebuild = vec![!local_trusted];
        let mut enabled = vec![true];
        for i in 0..self.members.peers.len() {
            rebuild.push(!handover && local_trusted);
            let v = &self.members.peers[i];
            // After a handover the previous writer (still reported as writer for a moment)
            // follows us, its Redis in sync: keep its stream.
            let live = self.members.is_live(v, now) && (handover || v.report.role != Some(Role::Writer));
            if live {
                self.known_boot.insert(v.id.clone(), v.report.boot);
            }
            enabled.push(live);
        }
        self.members.became_writer(epoch);
        WriterPlan { local_trusted, rebuild, enabled, fail_forwards: !handover }
    }

    /// The loser of a partition yielded to us with its writes (the merge starts): its stream
    /// stays enabled while it still reports itself as writer. `None` for an unknown node.
    pub fn yield_received(&mut self, from: &str, epoch: u64) -> Option<usize> {
        let i = self.members.peers.iter().position(|p| p.id == from)?;
        self.yielded.insert(from.to_string());
        self.members.epoch = self.members.epoch.max(epoch) + 1;
        let boot = self.members.peers[i].report.boot;
        self.known_boot.insert(from.to_string(), boot);
        Some(i + 1)
    }

    /// Which replica streams to enable or disable now. `enabled[i]`: stream `i` is enabled
    /// (index 0, our own Redis, is never changed here). A peer's stream is enabled while its
    /// sidecar was heard within half the failover timeout (before it could take the writer
    /// role) and follows; re-enabled with a rebuild when its sidecar restarted meanwhile.
    pub fn stream_changes(&mut self, now: u64, enabled: &[bool]) -> Vec<StreamChange> {
        let half = self.failover_timeout_ms / 2;
        let mut out = Vec::new();
        for (i, v) in self.members.peers.iter().enumerate() {
            let s = i + 1;
            let Some(&is_on) = enabled.get(s) else { continue };
            let fresh = v.last_heard_ms.is_some_and(|t| now.saturating_sub(t) <= half);
            let follows = if v.report.role == Some(Role::Writer) {
                self.yielded.contains(&v.id)
            } else {
                self.yielded.remove(&v.id);
                true
            };
            if !(fresh && follows) {
                if is_on {
                    out.push(StreamChange { stream: s, enable: false, rebuild: false });
                }
            } else if !is_on {
                let rebuild = self.known_boot.get(&v.id).copied() != Some(v.report.boot);
                out.push(StreamChange { stream: s, enable: true, rebuild });
                self.known_boot.insert(v.id.clone(), v.report.boot);
            }
        }
        out
    }

    /// Whether a follower may serve reads from its own Redis now: the writer, heard since we
    /// started following it and within 2/5 of the failover timeout (it stops waiting for our
    /// Redis after half of it of silence; we stop reading it before that), reports our
    /// Redis's current run (`local_run`, empty when unreachable) in sync. The writer itself
    /// passes `own_stream_in_sync`.
    pub fn local_reads(&mut self, now: u64, local_run: &str, own_stream_in_sync: Option<bool>) -> bool {
        let m = &self.members;
        match m.role {
            Role::Writer => own_stream_in_sync.unwrap_or(false),
            Role::Follower => {
                let fresh = self.failover_timeout_ms * 2 / 5;
                let w = m.writer.as_deref().and_then(|w| m.peer(w));
                match w {
                    Some(w) if m.is_live(w, now) && w.last_heard_ms.is_some_and(|t| t > self.followed_at) => {
                        let ok = w.report.replicas.iter().any(|(n, st, run)| {
                            n == &m.id && *st == ReplicaState::InSync && !local_run.is_empty() && run == local_run
                        });
                        self.local_was_in_sync = ok;
                        ok && w.last_heard_ms.is_some_and(|t| now.saturating_sub(t) <= fresh)
                    }
                    _ => false,
                }
            }
            Role::Starting => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FT: u64 = 1000;

    fn node(id: &str, prio: u32, peer: &str, peer_prio: u32) -> MirrorControl {
        MirrorControl::new(id, prio, 7, &[(peer.to_string(), peer_prio)], FT)
    }

    fn report(id: &str, boot: u64, role: Role, epoch: u64, writer: &str) -> Report {
        Report { id: id.into(), boot, priority: 1, role: Some(role), epoch, writer: writer.into(), replicas: vec![] }
    }

    #[test]
    fn requests_wait_until_a_writer_is_known_then_go_to_it() {
        let mut a = node("a", 1, "b", 2);
        assert_eq!(a.route(false), WriterPath::Hold);
        a.follow("b", 10);
        assert_eq!(a.route(false), WriterPath::Forward("b".into()));
        assert_eq!(a.route_forwarded(), ForwardedPath::NotWriter);
        a.set_draining(true);
        assert_eq!(a.route(false), WriterPath::Hold);
    }

    #[test]
    fn a_new_writer_waits_for_forwards_coming_back_after_a_handover() {
        let mut a = node("a", 2, "b", 1);
        let plan = a.become_writer(1, true, false, 5);
        assert!(plan.local_trusted && !plan.fail_forwards);
        assert_eq!(a.route(true), WriterPath::Hold);
        assert_eq!(a.route(false), WriterPath::Sequence);
        assert_eq!(a.route_forwarded(), ForwardedPath::Sequence);
    }

    #[test]
    fn a_follower_never_reported_in_sync_is_rebuilt_after_a_failover() {
        let mut a = node("a", 1, "b", 2);
        a.heard(report("b", 9, Role::Writer, 1, "b"), 10);
        a.follow("b", 20);
        // b's reports (after we followed) never name our Redis in sync.
        a.heard(report("b", 9, Role::Writer, 1, "b"), 30);
        assert!(!a.local_reads(31, "run-a", None));
        let plan = a.become_writer(2, false, false, 5000);
        assert!(!plan.local_trusted, "our Redis was never in sync: not the reference");
        assert_eq!(plan.rebuild, vec![true, false]);
        assert_eq!(plan.enabled, vec![true, false], "b is silent: its stream starts disabled");
        assert!(plan.fail_forwards);
    }

    #[test]
    fn a_follower_reported_in_sync_stays_the_reference_after_the_writer_goes_silent() {
        let mut a = node("a", 1, "b", 2);
        a.follow("b", 20);
        let mut r = report("b", 9, Role::Writer, 1, "b");
        r.replicas = vec![("a".into(), ReplicaState::InSync, "run-a".into())];
        a.heard(r, 30);
        assert!(a.local_reads(40, "run-a", None));
        assert!(!a.local_reads(40, "run-other", None), "another run of our Redis is not the one in sync");
        assert!(!a.local_reads(30 + FT * 2 / 5 + 1, "run-a", None), "stale writer: reads leave our Redis");
        let plan = a.become_writer(2, false, false, 5000);
        assert!(plan.local_trusted);
        assert_eq!(plan.rebuild, vec![false, true], "the peer's Redis is rebuilt from ours");
    }

    #[test]
    fn peer_streams_follow_freshness_and_a_restarted_sidecar_is_rebuilt() {
        let mut a = node("a", 2, "b", 1);
        a.heard(report("b", 9, Role::Follower, 0, ""), 0);
        let plan = a.become_writer(1, false, true, 10);
        assert_eq!(plan.enabled, vec![true, true]);
        assert!(a.stream_changes(100, &[true, true]).is_empty());
        // b silent for over half the failover timeout: disabled.
        assert_eq!(
            a.stream_changes(FT / 2 + 1, &[true, true]),
            vec![StreamChange { stream: 1, enable: false, rebuild: false }]
        );
        // b back with the same boot: enabled, no rebuild.
        a.heard(report("b", 9, Role::Follower, 1, "a"), 700);
        assert_eq!(
            a.stream_changes(701, &[true, false]),
            vec![StreamChange { stream: 1, enable: true, rebuild: false }]
        );
        // b restarted (new boot) while disabled: rebuilt.
        a.heard(report("b", 10, Role::Follower, 1, "a"), 2000);
        assert_eq!(
            a.stream_changes(2001, &[true, false]),
            vec![StreamChange { stream: 1, enable: true, rebuild: true }]
        );
    }

    #[test]
    fn a_peer_that_yielded_keeps_its_stream_while_it_still_says_writer() {
        let mut a = node("a", 2, "b", 1);
        a.heard(report("b", 9, Role::Writer, 3, "b"), 0);
        a.become_writer(3, false, true, 10);
        assert_eq!(
            a.stream_changes(20, &[true, true]),
            vec![StreamChange { stream: 1, enable: false, rebuild: false }],
            "another writer: no writes into its Redis"
        );
        assert_eq!(a.yield_received("b", 3), Some(1));
        assert!(a.members.epoch > 3);
        assert_eq!(a.stream_changes(30, &[true, true]), vec![], "yielded: kept while it still says writer");
        assert_eq!(a.yield_received("zz", 3), None);
    }
}

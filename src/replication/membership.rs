//! Who is the writer (DESIGN.md "one writer at a time"): every node runs the same rule over
//! what it last heard from its peers, so they agree without a third party. The writer is
//! the highest-priority live node; a node that finds no live writer for
//! `failover_timeout_ms` takes the role at a higher epoch; a higher-priority node that
//! returns asks the current writer to hand over once every replica is in sync; two writers
//! that meet after a partition resolve it by priority (the loser yields and its writes are
//! merged). Sans-IO: reports and the time are passed in.

use super::sequencer::ReplicaState;

/// A node's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Just started: waiting to hear from peers (at most one failover timeout).
    Starting,
    Follower,
    Writer,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Starting => "starting",
            Role::Follower => "follower",
            Role::Writer => "writer",
        }
    }
    fn parse(s: &str) -> Role {
        match s {
            "writer" => Role::Writer,
            "follower" => Role::Follower,
            _ => Role::Starting,
        }
    }
}

/// What a node tells its peers in every heartbeat (and what the status command shows).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub id: String,
    pub boot: u64,
    pub priority: u32,
    pub role: Option<Role>,
    pub epoch: u64,
    pub writer: String,
    /// The writer's view of each replica: (node, state, Redis run_id).
    pub replicas: Vec<(String, ReplicaState, String)>,
}

impl Report {
    /// `key:value` lines.
    pub fn encode(&self) -> String {
        let mut s = format!(
            "id:{}\nboot:{}\npriority:{}\nrole:{}\nepoch:{}\nwriter:{}\n",
            self.id,
            self.boot,
            self.priority,
            self.role.unwrap_or(Role::Starting).name(),
            self.epoch,
            self.writer
        );
        for (n, st, run) in &self.replicas {
            s.push_str(&format!("replica:{n} {} {run}\n", st.name()));
        }
        s
    }

    pub fn decode(text: &str) -> Option<Report> {
        let mut r = Report::default();
        // (A stray `\r` is not part of any value.)
        for line in text.lines().map(|l| l.trim_end_matches('\r')) {
            let (k, v) = line.split_once(':')?;
            match k {
                "id" => r.id = v.to_string(),
                "boot" => r.boot = v.parse().ok()?,
                "priority" => r.priority = v.parse().ok()?,
                "role" => r.role = Some(Role::parse(v)),
                "epoch" => r.epoch = v.parse().ok()?,
                "writer" => r.writer = v.to_string(),
                "replica" => {
                    let mut it = v.split(' ');
                    let n = it.next()?.to_string();
                    let st = ReplicaState::parse(it.next()?);
                    let run = it.next().unwrap_or("").to_string();
                    r.replicas.push((n, st, run));
                }
                _ => {}
            }
        }
        (!r.id.is_empty()).then_some(r)
    }

    /// Every replica the writer knows is in sync.
    pub fn all_in_sync(&self) -> bool {
        !self.replicas.is_empty() && self.replicas.iter().all(|(_, s, _)| *s == ReplicaState::InSync)
    }
}

/// What this node knows of one peer.
#[derive(Debug, Clone)]
pub struct PeerView {
    pub id: String,
    pub last_heard_ms: Option<u64>,
    pub report: Report,
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Take the writer role at `epoch`. `handover`: the previous writer drained and said
    /// every replica is in sync.
    BecomeWriter { epoch: u64, handover: bool },
    /// Follow `writer` (forward writes there).
    Follow { writer: String },
    /// Ask writer `peer` to hand the role over.
    AskHandover { peer: String },
    /// Another writer with a higher priority is live: drain, send it our partition writes,
    /// then follow it.
    Yield { to: String },
}

/// This node's view of the group.
#[derive(Debug)]
pub struct Membership {
    pub id: String,
    pub priority: u32,
    pub boot: u64,
    pub role: Role,
    pub epoch: u64,
    pub writer: Option<String>,
    pub peers: Vec<PeerView>,
    started_ms: u64,
    timeout_ms: u64,
    asked_handover_ms: Option<u64>,
    /// Set while yielding or handing over: no new decisions until the shell finishes.
    pub busy: bool,
}

impl Membership {
    pub fn new(
        id: &str,
        priority: u32,
        boot: u64,
        peers: &[(String, u32)],
        timeout_ms: u64,
        now_ms: u64,
    ) -> Membership {
        Membership {
            id: id.to_string(),
            priority,
            boot,
            role: Role::Starting,
            epoch: 0,
            writer: None,
            peers: peers
                .iter()
                .map(|(p, prio)| PeerView {
                    id: p.clone(),
                    last_heard_ms: None,
                    report: Report { id: p.clone(), priority: *prio, ..Default::default() },
                })
                .collect(),
            started_ms: now_ms,
            timeout_ms,
            asked_handover_ms: None,
            busy: false,
        }
    }

    pub fn is_live(&self, p: &PeerView, now_ms: u64) -> bool {
        p.last_heard_ms.is_some_and(|t| now_ms.saturating_sub(t) <= self.timeout_ms)
    }

    pub fn peer(&self, id: &str) -> Option<&PeerView> {
        self.peers.iter().find(|p| p.id == id)
    }

    /// A report from peer `id` arrived (heartbeat either way). Returns the previous report.
    pub fn heard(&mut self, report: Report, now_ms: u64) -> Option<Report> {
        let p = self.peers.iter_mut().find(|p| p.id == report.id)?;
        let was = p.last_heard_ms.map(|_| p.report.clone());
        p.last_heard_ms = Some(now_ms);
        if report.epoch > self.epoch && report.role == Some(Role::Writer) && self.role != Role::Writer {
            self.epoch = report.epoch;
        }
        p.report = report;
        was
    }

    fn max_epoch(&self) -> u64 {
        self.peers.iter().map(|p| p.report.epoch).max().unwrap_or(0).max(self.epoch)
    }

    /// Apply a decision the shell carried out.
    pub fn became_writer(&mut self, epoch: u64) {
        self.role = Role::Writer;
        self.epoch = epoch.max(self.max_epoch() + 1);
        self.writer = Some(self.id.clone());
        self.asked_handover_ms = None;
    }

    pub fn follow(&mut self, writer: &str) {
        self.role = Role::Follower;
        self.writer = Some(writer.to_string());
        if let Some(p) = self.peer(writer) {
            self.epoch = self.epoch.max(p.report.epoch);
        }
    }

    /// What to do now.
    pub fn tick(&mut self, now_ms: u64) -> Option<Decision> {
        if self.busy {
            return None;
        }
        let live: Vec<&PeerView> = self.peers.iter().filter(|p| self.is_live(p, now_ms)).collect();
        if self.role == Role::Starting
            && live.len() < self.peers.len()
            && now_ms.saturating_sub(self.started_ms) < self.timeout_ms
        {
            return None;
        }
        let key = |prio: u32, id: &str| (prio, id.to_string());
        let me = key(self.priority, &self.id);
        let writers: Vec<&&PeerView> = live.iter().filter(|p| p.report.role == Some(Role::Writer)).collect();
        if self.role == Role::Writer {
            let better = writers
                .iter()
                .filter(|p| key(p.report.priority, &p.id) > me)
                .max_by_key(|p| key(p.report.priority, &p.id));
            return better.map(|p| Decision::Yield { to: p.id.clone() });
        }
        if let Some(w) = writers.iter().max_by_key(|p| (p.report.epoch, key(p.report.priority, &p.id))) {
            if self.writer.as_deref() != Some(w.id.as_str()) || self.role != Role::Follower {
                return Some(Decision::Follow { writer: w.id.clone() });
            }
            let highest = live.iter().all(|p| key(p.report.priority, &p.id) < me);
            let asked_recently = self.asked_handover_ms.is_some_and(|t| now_ms.saturating_sub(t) < self.timeout_ms);
            let my_replica_in_sync =
                w.report.replicas.iter().any(|(n, s, _)| n == &self.id && *s == ReplicaState::InSync);
            if highest && w.report.all_in_sync() && my_replica_in_sync && !asked_recently {
                self.asked_handover_ms = Some(now_ms);
                return Some(Decision::AskHandover { peer: w.id.clone() });
            }
            return None;
        }
        // No live writer: the highest-priority live node takes the role.
        let best_peer = live.iter().map(|p| key(p.report.priority, &p.id)).max();
        if best_peer.is_none_or(|b| b < me) {
            return Some(Decision::BecomeWriter { epoch: self.max_epoch() + 1, handover: false });
        }
        if self.role == Role::Follower && self.writer.is_some() {
            // Our writer is gone; wait for the better candidate to take over.
            self.writer = None;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(id: &str, prio: u32, role: Role, epoch: u64, in_sync: bool) -> Report {
        let st = if in_sync { ReplicaState::InSync } else { ReplicaState::Resyncing };
        Report {
            id: id.into(),
            boot: 1,
            priority: prio,
            role: Some(role),
            epoch,
            writer: if role == Role::Writer { id.into() } else { String::new() },
            replicas: vec![("a".into(), st, "r1".into()), ("b".into(), ReplicaState::InSync, "r2".into())],
        }
    }

    #[test]
    fn report_round_trips() {
        let r = report("b", 90, Role::Writer, 3, true);
        assert_eq!(Report::decode(&r.encode()), Some(r));
    }

    #[test]
    fn higher_priority_becomes_writer_and_lower_follows() {
        let mut a = Membership::new("a", 100, 1, &[("b".into(), 90)], 1000, 0);
        let mut b = Membership::new("b", 90, 2, &[("a".into(), 100)], 1000, 0);
        a.heard(report("b", 90, Role::Starting, 0, false), 10);
        b.heard(report("a", 100, Role::Starting, 0, false), 10);
        assert_eq!(a.tick(20), Some(Decision::BecomeWriter { epoch: 1, handover: false }));
        a.became_writer(1);
        assert_eq!(b.tick(20), None, "b waits for a");
        b.heard(report("a", 100, Role::Writer, 1, false), 30);
        assert_eq!(b.tick(40), Some(Decision::Follow { writer: "a".into() }));
    }

    #[test]
    fn failover_after_timeout_then_handover_back() {
        let mut b = Membership::new("b", 90, 2, &[("a".into(), 100)], 1000, 0);
        b.heard(report("a", 100, Role::Writer, 1, true), 0);
        assert!(matches!(b.tick(1), Some(Decision::Follow { .. })));
        b.follow("a");
        assert_eq!(b.tick(900), None);
        assert_eq!(b.tick(1500), Some(Decision::BecomeWriter { epoch: 2, handover: false }));
        b.became_writer(2);
        // a returns (new boot) and follows; once b says all in sync, a asks for the role.
        let mut a = Membership::new("a", 100, 7, &[("b".into(), 90)], 1000, 2000);
        a.heard(report("b", 90, Role::Writer, 2, false), 2000);
        assert_eq!(a.tick(2001), Some(Decision::Follow { writer: "b".into() }));
        a.follow("b");
        assert_eq!(a.tick(2002), None, "a's replica is not in sync yet");
        a.heard(report("b", 90, Role::Writer, 2, true), 2100);
        assert_eq!(a.tick(2101), Some(Decision::AskHandover { peer: "b".into() }));
    }

    #[test]
    fn two_writers_after_a_partition_lower_priority_yields() {
        let mut b = Membership::new("b", 90, 2, &[("a".into(), 100)], 1000, 0);
        b.became_writer(2);
        b.heard(report("a", 100, Role::Writer, 1, false), 10);
        assert_eq!(b.tick(11), Some(Decision::Yield { to: "a".into() }));
        let mut a = Membership::new("a", 100, 1, &[("b".into(), 90)], 1000, 0);
        a.became_writer(1);
        a.heard(report("b", 90, Role::Writer, 2, false), 10);
        assert_eq!(a.tick(11), None);
    }
}

//! Native mode's routing facts, published by the control plane (core 0's `server::native`)
//! for every core's sessions and lanes: where writes go, whether reads may stay local, whether
//! `WAIT` is worth sending, and the keys recorded while this side may be cut off (DESIGN.md
//! N3, N4, N6). Atomics on the data path; the recorded-key set is locked only while recording,
//! after an unconfirmed write, and for writes sent to the peer's Redis while keys are recorded
//! or our Redis does not replicate it. This module decides nothing (`replication::native` does).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

use crate::replication::native::{Route, Side};

/// Most keys recorded for a partition merge; past it the merge copies every key instead.
pub const MAX_RECORDED_KEYS: usize = 1_000_000;

/// Where a write goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteTarget {
    /// No primary now (forming, failing over, merging): hold the request.
    Hold,
    /// The local Redis.
    Local,
    /// The peer's Redis.
    Peer,
}

/// Keys written while this side might be cut off from the other.
#[derive(Debug, Default)]
pub struct Recorded {
    /// (database, key).
    pub keys: HashSet<(u32, Bytes)>,
    /// Keys this side's clients wrote to the peer's Redis and that were acknowledged there
    /// alone (its replica, ours, was not connected): their newest values are only there, so
    /// a merge out of the peer's Redis must carry them too.
    pub peer_written: HashSet<(u32, Bytes)>,
    /// More keys than `MAX_RECORDED_KEYS`, or a write whose keys are unknown (FLUSHALL, a
    /// module command): the merge must copy every key.
    pub overflow: bool,
}

/// The published route (see the module doc).
#[derive(Debug, Default)]
pub struct NativeRoute {
    writes: AtomicU8,
    reads_local: AtomicBool,
    recording: AtomicBool,
    replica_linked: AtomicBool,
    /// Bumped on every change of the write target.
    generation: AtomicU64,
    /// Keys recorded for a partition merge.
    pub recorded: Mutex<Recorded>,
    /// Whether `recorded` holds anything (checked without the lock).
    has_recorded: AtomicBool,
    /// Writes acknowledged on the primary alone (the replica was not connected).
    pub acks_on_primary_alone: AtomicU64,
    /// Writes whose `WAIT` came back 0 (the replica did not confirm in time).
    pub unconfirmed_writes: AtomicU64,
    /// The run of the local / the peer's Redis the control plane approved for writes
    /// (`run_id_hash`; 0: none).
    approved_local: AtomicU64,
    approved_peer: AtomicU64,
}

/// A run_id as a number for cheap comparisons (FNV-1a; never 0 for a non-empty id).
pub fn run_id_hash(run_id: &str) -> u64 {
    if run_id.is_empty() {
        return 0;
    }
    let h = run_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    h.max(1)
}

impl NativeRoute {
    /// Publish a decision. `replica_linked`: the replica of the primary is connected.
    pub fn publish(&self, route: Route, replica_linked: bool) {
        let w = match route.writes {
            None => 0,
            Some(Side::Local) => 1,
            Some(Side::Peer) => 2,
        };
        if self.writes.swap(w, Ordering::AcqRel) != w {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        self.reads_local.store(route.reads_local, Ordering::Release);
        self.recording.store(route.recording, Ordering::Release);
        self.replica_linked.store(replica_linked, Ordering::Release);
    }

    /// Approve the runs of both Redis the decisions were taken on (`None`: unknown).
    pub fn approve(&self, local: Option<&str>, peer: Option<&str>) {
        self.approved_local.store(local.map_or(0, run_id_hash), Ordering::Release);
        self.approved_peer.store(peer.map_or(0, run_id_hash), Ordering::Release);
    }

    /// Whether a connection reaching run `run` of that side's Redis may carry writes.
    pub fn approved(&self, side: Side, run: u64) -> bool {
        let ok = match side {
            Side::Local => self.approved_local.load(Ordering::Acquire),
            Side::Peer => self.approved_peer.load(Ordering::Acquire),
        };
        run != 0 && ok == run
    }

    /// Where writes go now.
    pub fn writes(&self) -> WriteTarget {
        match self.writes.load(Ordering::Acquire) {
            1 => WriteTarget::Local,
            2 => WriteTarget::Peer,
            _ => WriteTarget::Hold,
        }
    }

    /// Whether reads may use the local Redis.
    pub fn reads_local(&self) -> bool {
        self.reads_local.load(Ordering::Acquire)
    }

    /// Whether the keys of writes sent to the local Redis must be recorded now.
    pub fn recording(&self) -> bool {
        self.recording.load(Ordering::Acquire)
    }

    /// Whether the primary has a connected replica (a `WAIT 1` can succeed).
    pub fn replica_linked(&self) -> bool {
        self.replica_linked.load(Ordering::Acquire)
    }

    /// Changes of the write target so far.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Record keys written in database `db` (`None`: the keys are unknown).
    pub fn record<'a>(&self, db: u32, keys: Option<impl Iterator<Item = &'a [u8]>>) {
        let Ok(mut r) = self.recorded.lock() else { return };
        self.has_recorded.store(true, Ordering::Release);
        match keys {
            None => r.overflow = true,
            Some(keys) => {
                for k in keys {
                    if r.keys.len() >= MAX_RECORDED_KEYS {
                        r.overflow = true;
                        break;
                    }
                    r.keys.insert((db, Bytes::copy_from_slice(k)));
                }
            }
        }
    }

    /// Record the keys of one request frame (parsed again: only after an unconfirmed write).
    pub fn record_frame(&self, db: u32, frame: &Bytes) {
        let mut buf = BytesMut::from(&frame[..]);
        let parsed = crate::resp::RequestParser::new(usize::MAX >> 1).parse(&mut buf);
        let Ok(Some(req)) = parsed else { return };
        self.record_request(db, &req);
    }

    /// Record the keys a request writes.
    pub fn record_request(&self, db: u32, req: &crate::resp::Request) {
        match crate::command::lookup(req) {
            Some(def) => {
                let idx = crate::command::key_indices(def, req);
                if idx.is_empty() {
                    // FLUSHALL, FLUSHDB, SWAPDB, scripts without keys: cannot be named.
                    self.record(db, None::<std::iter::Empty<&[u8]>>);
                } else {
                    self.record(db, Some(idx.iter().map(|&i| req.arg(i))));
                }
            }
            None => self.record(db, None::<std::iter::Empty<&[u8]>>),
        }
    }

    /// A client of this side wrote `req` to the peer's Redis: its keys' newest values are
    /// there now, so a merge must not copy this side's older values over them; and while
    /// our Redis does not replicate the peer's, those values exist only there.
    pub fn forget_request(&self, db: u32, req: &crate::resp::Request) {
        let alone = !self.replica_linked();
        if !alone && !self.has_recorded.load(Ordering::Acquire) {
            return;
        }
        let Some(def) = crate::command::lookup(req) else { return };
        let Ok(mut r) = self.recorded.lock() else { return };
        self.has_recorded.store(true, Ordering::Release);
        for i in crate::command::key_indices(def, req) {
            let k = (db, Bytes::copy_from_slice(req.arg(i)));
            r.keys.remove(&k);
            if alone && r.peer_written.len() < MAX_RECORDED_KEYS {
                r.peer_written.insert(k);
            }
        }
    }

    /// The keys written to the peer's Redis alone (for the peer's merge).
    pub fn snapshot_peer_written(&self) -> Vec<(u32, Bytes)> {
        self.recorded.lock().map(|r| r.peer_written.iter().cloned().collect()).unwrap_or_default()
    }

    /// Our Redis replicates the peer's again: the keys written there alone reached it.
    pub fn clear_peer_written(&self) {
        if let Ok(mut r) = self.recorded.lock() {
            r.peer_written.clear();
        }
    }

    /// A copy of the recorded keys (for a merge).
    pub fn snapshot_recorded(&self) -> (Vec<(u32, Bytes)>, bool) {
        self.recorded.lock().map(|r| (r.keys.iter().cloned().collect(), r.overflow)).unwrap_or_default()
    }

    /// Forget the recorded keys.
    pub fn clear_recorded(&self) {
        if let Ok(mut r) = self.recorded.lock() {
            r.keys.clear();
            r.overflow = false;
            self.has_recorded.store(!r.peer_written.is_empty(), Ordering::Release);
        }
    }

    /// How many keys are recorded and whether the set overflowed.
    pub fn recorded_count(&self) -> (usize, bool) {
        self.recorded.lock().map(|r| (r.keys.len(), r.overflow)).unwrap_or((0, false))
    }
}

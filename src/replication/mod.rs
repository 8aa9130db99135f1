//! Active-active replication (DESIGN.md, "The core invariants"), without I/O:
//! - [`membership`]: who is the writer, epochs, failover, handover, partition resolution.
//! - [`sequencer`]: the writer's ordered streams to every replica Redis, backlogs, acks,
//!   full resync and partition merge copies, blocking pops and WATCH.
//! - [`effects`]: how a write is shipped so that replicas end equal (absolute expiry,
//!   SPOP → SREM, key copies).
//! - [`mirror`]: mirror mode's control plane around membership: hold / forward / sequence,
//!   the reference copy on a role change, replica-stream freshness and rebuilds, local reads.
//! - [`native`]: native mode's control plane (Redis's own replication, steered): roles from
//!   evidence, failover, routing, partition recording and merge decisions.
//! - [`acl`]: native mode: whether both Redis hold the same ACL users.
//! - [`reply`]: the reply shapes the above look inside.
//! - [`writer_request`]: mirror mode: a client's request, parsed once, on its way to the
//!   writer (and its `RS.FWD` encoding).
//!
//! The runtime shell (`server::replica`, `server::peer`) feeds these with sockets and time.

pub mod acl;
pub mod effects;
pub mod membership;
pub mod mirror;
pub mod native;
pub mod reply;
pub mod sequencer;
pub mod writer_request;

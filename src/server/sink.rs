//! Where a request's reply goes ([`Sink`]), the one way to hand it over ([`deliver_to`]),
//! and a request waiting with its sink on the pair's writer path ([`Held`]).
//!
//! Lanes, the replication shell and the cores' inboxes carry sinks; clients and peer links
//! take replies through [`ReplyTarget`]. This module names neither, which is what keeps the
//! imports one way: `client` and `peer` sit above `lane`, `replica` above `peer`.

use std::rc::Rc;

use bytes::Bytes;

use super::{Core, CoreMsg};
use crate::replication::writer_request::WriterRequest;

/// Something on this core that waits for replies, each under the tag it sent it with: a
/// client (tag: its request's sequence number) or a peer sidecar's link (tag: the peer's).
pub(crate) trait ReplyTarget {
    /// The reply to request `tag`.
    fn deliver(&self, tag: u64, reply: Bytes);

    /// Mirror mode: request `tag` was forwarded here to the writer, and this node is not the
    /// writer (the sender tries again where it is). Only a peer link has a sender that can;
    /// for anyone else nothing is sent.
    fn not_writer(&self, _tag: u64) {}
}

/// Where a reply goes.
pub(crate) enum Sink {
    /// Nobody: a SELECT the lane inserted itself.
    Discard,
    /// A client or peer link of this core, under its tag.
    To(Rc<dyn ReplyTarget>, u64),
    /// A client of another core (the request hopped here to its sequencer).
    Remote { core: usize, client: u64, seq: u64 },
}

/// Hand a reply to whoever waits for it.
pub(crate) fn deliver_to(core: &Core, sink: Sink, reply: Bytes) {
    match sink {
        Sink::Discard => {}
        Sink::To(target, tag) => target.deliver(tag, reply),
        Sink::Remote { core: dest, client, seq } => core.send(dest, CoreMsg::Reply { client, seq, reply }),
    }
}

/// Mirror mode: a request on its way to the writer's sequencer, held while no writer can
/// take it (a client's of this node, or one a peer forwarded).
pub(crate) struct Held {
    pub sink: Sink,
    pub client_key: u64,
    pub db: u32,
    pub proto: u8,
    /// Parsed once, on the client's core (or decoded from the peer link).
    pub work: WriterRequest,
    /// Give up (TRYAGAIN) if no writer takes it by then (monotonic ms; 0 = not held yet).
    pub deadline_ms: u64,
}

//! Property test of the writer's sequencer as a state machine, driven in memory (it has no
//! I/O): random client requests, replies, lost and restored connections, restarted Redis and
//! disabled peers, against two fake Redis that answer every command. Whatever happens:
//! nothing panics, every request is answered exactly once once the replicas are back, and
//! both replicas end in sync with nothing left in their logs.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use resplica::replication::sequencer::{Origin, ReplicaState, Sequencer, WriterRequest};
use resplica::resp::{Request, RequestParser};

/// A fake Redis: the replies one batch of commands gets, in order.
#[derive(Default)]
struct FakeRedis {
    /// Replies owed, oldest first (delivered a few at a time by the test).
    owed: Vec<Bytes>,
    in_multi: Option<usize>,
}

impl FakeRedis {
    /// One batch as the sequencer hands it out: buffers written in order.
    fn take(&mut self, batch: &std::collections::VecDeque<Bytes>) {
        let mut buf = BytesMut::new();
        for chunk in batch {
            buf.extend_from_slice(chunk);
        }
        let mut p = RequestParser::new(1 << 30);
        while let Ok(Some(r)) = p.parse(&mut buf) {
            let name = r.arg(0).to_ascii_uppercase();
            let reply: Bytes = match (&name[..], self.in_multi) {
                (b"MULTI", _) => {
                    self.in_multi = Some(0);
                    Bytes::from_static(b"+OK\r\n")
                }
                (b"EXEC", Some(n)) => {
                    self.in_multi = None;
                    let mut out = format!("*{n}\r\n").into_bytes();
                    for _ in 0..n {
                        out.extend_from_slice(b"$-1\r\n");
                    }
                    Bytes::from(out)
                }
                (_, Some(n)) => {
                    self.in_multi = Some(n + 1);
                    Bytes::from_static(b"+QUEUED\r\n")
                }
                (b"SPOP", None) => Bytes::from_static(b"$1\r\nm\r\n"),
                (b"DUMP", None) => Bytes::from_static(b"$3\r\nabc\r\n"),
                (b"PTTL", None) => Bytes::from_static(b":-1\r\n"),
                (b"GET", None) => Bytes::from_static(b"$-1\r\n"),
                (b"INCR", None) => Bytes::from_static(b":1\r\n"),
                _ => Bytes::from_static(b"+OK\r\n"),
            };
            self.owed.push(reply);
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Submit(u8, u8),
    Pump(u8),
    Deliver(u8, u8),
    Down(u8),
    Up(u8, bool),
    Disable(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..8, 0u8..6).prop_map(|(k, c)| Op::Submit(k, c)),
        3 => (0u8..2).prop_map(Op::Pump),
        4 => (0u8..2, 1u8..6).prop_map(|(s, n)| Op::Deliver(s, n)),
        1 => (0u8..2).prop_map(Op::Down),
        1 => (0u8..2, any::<bool>()).prop_map(|(s, r)| Op::Up(s, r)),
        1 => any::<bool>().prop_map(Op::Disable),
    ]
}

fn request(key: u8, cmd: u8) -> Vec<Request> {
    let k = format!("k{key}");
    let r = |a: &[&str]| Request::from_args(a);
    match cmd {
        0 => vec![r(&["SET", &k, "v"])],
        1 => vec![r(&["INCR", &k])],
        2 => vec![r(&["SPOP", &k])],
        3 => vec![r(&["GET", &k])],
        4 => vec![r(&["MULTI"]), r(&["SET", &k, "x"]), r(&["EXPIRE", &k, "10"]), r(&["EXEC"])],
        _ => vec![r(&["SET", &k, "v", "EX", "5"])],
    }
}

struct World {
    seq: Sequencer,
    redis: [FakeRedis; 2],
    connected: [bool; 2],
    run_ids: [u32; 2],
    answered: HashMap<u64, u32>,
    submitted: u64,
}

impl World {
    fn collect(&mut self) {
        for (t, _) in self.seq.take_replies() {
            *self.answered.entry(t).or_default() += 1;
        }
        for t in self.seq.take_scans() {
            // The fake keyspace has one key per stream: copy it, then the scan is done.
            if let Some(src) = self.seq.resync_source(t) {
                self.seq.copy_key(0, Bytes::from_static(b"k0"), src, t);
            }
            self.seq.scan_done(t);
        }
        for s in 0..2 {
            if self.seq.streams[s].drop_conn && self.connected[s] {
                self.down(s);
                self.up(s, false);
            }
        }
    }

    fn pump(&mut self, s: usize) {
        if !self.connected[s] {
            return;
        }
        while let Some(b) = self.seq.take_batch(s) {
            self.redis[s].take(&b);
        }
        self.collect();
    }

    fn deliver(&mut self, s: usize, n: usize) {
        for _ in 0..n {
            if self.redis[s].owed.is_empty() {
                break;
            }
            let r = self.redis[s].owed.remove(0);
            self.seq.on_reply(s, r, 1_000).expect("replies match what was sent");
        }
        self.collect();
    }

    fn down(&mut self, s: usize) {
        if self.connected[s] {
            self.connected[s] = false;
            self.redis[s] = FakeRedis::default();
            self.seq.on_down(s, "test");
            self.collect();
        }
    }

    fn up(&mut self, s: usize, restarted: bool) {
        if !self.connected[s] {
            if restarted {
                self.run_ids[s] += 1;
            }
            self.connected[s] = true;
            self.seq.on_up(s, &format!("run{}", self.run_ids[s]));
            self.collect();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn sequencer_survives_anything_and_settles(ops in proptest::collection::vec(op(), 1..120), ack_all in any::<bool>()) {
        let replicas = [("a".to_string(), "ra".to_string(), false), ("b".to_string(), "rb".to_string(), false)];
        let mut w = World {
            seq: Sequencer::new(&replicas, ack_all, 4096),
            redis: Default::default(),
            connected: [false; 2],
            run_ids: [0; 2],
            answered: HashMap::new(),
            submitted: 0,
        };
        w.up(0, false);
        w.up(1, false);
        for op in ops {
            match op {
                Op::Submit(k, c) => {
                    w.submitted += 1;
                    let o = Origin { ticket: w.submitted, client_key: w.submitted, db: 0, proto: 2 };
                    let work = match WriterRequest::from_frames(request(k, c), false) {
                        Some(WriterRequest::One { req, .. }) => WriterRequest::One { req, write: c != 3 },
                        Some(block) => block,
                        None => unreachable!("request() builds one command or a block"),
                    };
                    w.seq.submit(o, work, 1_000);
                    w.collect();
                }
                Op::Pump(s) => w.pump(s as usize),
                Op::Deliver(s, n) => w.deliver(s as usize, n as usize),
                Op::Down(s) => w.down(s as usize),
                Op::Up(s, r) => w.up(s as usize, r),
                Op::Disable(on) => {
                    w.seq.set_enabled(1, !on, false);
                    w.collect();
                }
            }
        }
        // Heal everything and let it settle.
        w.seq.set_enabled(1, true, false);
        w.up(0, false);
        w.up(1, false);
        for _ in 0..200 {
            w.pump(0);
            w.pump(1);
            w.deliver(0, 1000);
            w.deliver(1, 1000);
        }
        for (t, n) in &w.answered {
            prop_assert_eq!(*n, 1, "ticket {} answered {} times", t, n);
        }
        prop_assert_eq!(w.answered.len() as u64, w.submitted, "every request answered");
        for s in 0..2 {
            prop_assert_eq!(w.seq.streams[s].state, ReplicaState::InSync, "stream {} settles in sync", s);
            prop_assert_eq!(w.seq.streams[s].backlog_entries(), 0);
        }
    }
}
